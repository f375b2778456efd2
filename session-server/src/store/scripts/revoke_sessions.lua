-- Revokes a set of one user's sessions (one for RevokeSession; those in the
-- index when the caller read it for RevokeAllUserSessions). Each revoked
-- session is deleted and leaves a revocation marker in the same step, so that
-- CreateSession never brings its token id back while its reservation lasts.
-- KEYS[1]   user_sessions:{<user_id>}
-- KEYS[2]   reservations:{<user_id>}   token ids scored by the latest end (ms)
--                                      a claim may give their reservation
--                                      (prepare_create.lua)
-- KEYS[3..] for each ARGV[i + 7] in order, two keys: session:{<user_id>}:{<t>}
--           at KEYS[2i + 1] and revoked:{<user_id>}:{<t>} at KEYS[2i + 2];
--           then, when ARGV[7] is set, session:{<user_id>}:{<ARGV[7]>} last
-- ARGV[1]   how much longer a marker lives than its session, in ms: as much as
--           a reservation outlives the session it was claimed for
-- ARGV[2]   SESSION_TTL_MAX in ms: the marker's base for a session key without
--           a TTL (never written by this server)
-- ARGV[3]   the marker's reason: revoked or signed_out_everywhere
-- ARGV[4]   the revocation channel (store/revocations.rs): with reason revoked,
--           each revoked session is published on it as
--           `r:<revoked_at_ms>:revoked:<user_id>:<token_id>`; with
--           signed_out_everywhere, one message for the whole user,
--           `r:<cut_ms>:signed_out_everywhere:<user_id>:`, when any session was
--           revoked, with cut_ms the later of now and the latest created_at_ms
--           among them
-- ARGV[5]   the user id
-- ARGV[6]   empty, or (when following rotations) a JSON array of family ids
--           matching ARGV[8..]: a token counts as live only while its session
--           is of that family (the token may have expired and been created
--           again in another family since its predecessor's marker was written)
-- ARGV[7]   empty, or the token id of the session RevokeOtherUserSessions
--           keeps: unless that session is live (its key, the last of KEYS),
--           nothing is revoked, published or written, and the answer is {-1};
--           so a call answered "kept" had its session live as the others
--           ended, and two such calls of one user never end each other's
-- ARGV[8..] token ids
-- Returns   {revoked, successor, family, successor, family...}: how many of
--           them were live (their key still existed); nothing is written (or
--           published) for the others but the removal of stale index entries.
--           Then, for each token that was not live because a rotation
--           replaced it (its marker says so, rotate_session.lua), the token
--           that replaced it and their family: the caller revokes those too,
--           so a revocation racing a rotation still ends the family.
local slack = tonumber(ARGV[1])
local longest = tonumber(ARGV[2])
local now = now_ms()
local marker = string.format('{"revoked_at_ms":%.0f,"reason":"%s"}', now, ARGV[3])
local whole_user = ARGV[3] == 'signed_out_everywhere'
local families = ARGV[6] ~= '' and cjson.decode(ARGV[6]) or nil
local count = #ARGV - 7
if ARGV[7] ~= '' and redis.call('EXISTS', KEYS[2 * count + 3]) == 0 then
  return {-1}
end
-- The family of a stored session: the layout ends with it and the times, so
-- the match is anchored at the end, where no metadata can be.
local function family_of(json)
  return string.match(json,
    '"family_id":"([^"]*)","family_expires_at_ms":%d+,"created_at_ms":%d+,"expires_at_ms":%d+}$')
end

-- First, without writing: which sessions are live, and publish them. A
-- PUBLISH refused (an ACL without the channel) fails the script before any
-- write, so a revocation is never done without being published. Subscribers
-- see the messages only once the script has ended: Redis is single-threaded.
local live = {}
-- Followed tokens whose session now belongs to another family: left alone.
local foreign = {}
local cut = now
for i = 1, count do
  local left = redis.call('PTTL', KEYS[2 * i + 1])
  if left ~= -2 and families then
    local json = redis.call('GET', KEYS[2 * i + 1])
    if not json or family_of(json) ~= families[i] then
      left = -2
      foreign[i] = true
    end
  end
  if left ~= -2 then
    live[i] = left
    if whole_user then
      -- The user-wide message says "every session created at or before
      -- revoked_at": make sure that covers each session revoked here, even
      -- one created by a master whose clock was ahead (before a failover).
      local json = redis.call('GET', KEYS[2 * i + 1])
      local created = json and tonumber(string.match(json, '"created_at_ms":(%d+)'))
      if created and created > cut then
        cut = created
      end
    else
      redis.call('PUBLISH', ARGV[4], string.format('r:%.0f:revoked:%s:%s', now, ARGV[5], ARGV[i + 7]))
    end
  end
end
if whole_user and next(live) ~= nil then
  redis.call('PUBLISH', ARGV[4], string.format('r:%.0f:signed_out_everywhere:%s:', cut, ARGV[5]))
end

-- Then the writes. Each session is deleted before its marker is written: once
-- a script has written, Redis lets it finish even past maxmemory, so a
-- revocation is never half done for want of memory.
local revoked = 0
local answer = {0}
for i = 1, count do
  local token, session, tomb = ARGV[i + 7], KEYS[2 * i + 1], KEYS[2 * i + 2]
  local left = live[i]
  if foreign[i] then
    -- Another family's session now: not this revocation's to end.
  elseif left then
    end_session(session, tomb, KEYS[1], KEYS[2], token, left, marker, slack, longest, now)
    revoked = revoked + 1
  else
    -- A stale index entry (the session expired) leaves the index.
    redis.call('ZREM', KEYS[1], token)
    local previous = redis.call('GET', tomb)
    if previous and string.find(previous, '"reason":"rotated"', 1, true) then
      local ok, decoded = pcall(cjson.decode, previous)
      if ok and type(decoded.successor) == 'string' and type(decoded.family) == 'string' then
        answer[#answer + 1] = decoded.successor
        answer[#answer + 1] = decoded.family
      end
    end
  end
end
answer[1] = revoked
return answer
