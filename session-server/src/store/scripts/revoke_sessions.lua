-- Revokes a set of one user's sessions (one for RevokeSession; those in the
-- index when the caller read it for RevokeAllUserSessions). Each revoked
-- session is deleted and leaves a revocation marker in the same step, so that
-- CreateSession never brings its token id back while its reservation lasts.
-- KEYS[1]   user_sessions:{<user_id>}
-- KEYS[2]   reservations:{<user_id>}   token ids whose reservation a replay
--                                      extended past their session (see
--                                      create_session.lua), scored by its end (ms)
-- KEYS[3..] for each ARGV[i + 5] in order, two keys: session:{<user_id>}:{<t>}
--           at KEYS[2i + 1] and revoked:{<user_id>}:{<t>} at KEYS[2i + 2]
-- ARGV[1]   how much longer a marker lives than its session, in ms: as much as
--           a reservation outlives the session it was claimed for
-- ARGV[2]   SESSION_TTL_MAX in ms: the marker's base for a session key without
--           a TTL (never written by this server)
-- ARGV[3]   the marker's reason: revoked or signed_out_everywhere
-- ARGV[4]   the revocation channel (store/revocations.rs): with reason revoked,
--           each revoked session is published on it as
--           `r:<revoked_at_ms>:revoked:<user_id>:<token_id>`; with
--           signed_out_everywhere, one message for the whole user,
--           `r:<revoked_at_ms>:signed_out_everywhere:<user_id>:`, when any
--           session was revoked
-- ARGV[5]   the user id
-- ARGV[6..] token ids
-- Returns   how many of them were live (their key still existed); nothing is
--           written (or published) for the others but the removal of stale
--           index entries.
-- Each session is deleted before its marker is written: once a script has
-- written, Redis lets it finish even past maxmemory, so a revocation is never
-- half done for want of memory.
local slack = tonumber(ARGV[1])
local longest = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local marker = string.format('{"revoked_at_ms":%.0f,"reason":"%s"}', now, ARGV[3])
local revoked = 0
local whole_user = ARGV[3] == 'signed_out_everywhere'
for i = 1, #ARGV - 5 do
  local token, session, tomb = ARGV[i + 5], KEYS[2 * i + 1], KEYS[2 * i + 2]
  local left = redis.call('PTTL', session)
  redis.call('ZREM', KEYS[1], token)
  if left == -1 then
    left = longest
  end
  if left >= 0 then
    local keep = left + slack
    local floor = redis.call('ZSCORE', KEYS[2], token)
    if floor then
      keep = math.max(keep, tonumber(floor) - now)
      redis.call('ZREM', KEYS[2], token)
    end
    redis.call('DEL', session)
    redis.call('SET', tomb, marker, 'PX', keep)
    revoked = revoked + 1
    if not whole_user then
      redis.call('PUBLISH', ARGV[4], string.format('r:%.0f:revoked:%s:%s', now, ARGV[5], token))
    end
  end
end
-- Published in the step that revokes: no revocation is acknowledged without
-- being on the stream. One user-wide message covers every session created at
-- or before `now`, including any created after the caller read the index.
if whole_user and revoked > 0 then
  redis.call('PUBLISH', ARGV[4], string.format('r:%.0f:signed_out_everywhere:%s:', now, ARGV[5]))
end
return revoked
