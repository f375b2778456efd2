-- Revokes a set of one user's sessions: those in the index when the caller read
-- it. Each revoked session leaves a revocation marker, as in revoke_session.lua.
-- KEYS[1]   user_sessions:{<user_id>}
-- KEYS[2..] for each ARGV[i + 2] in order, two keys: session:{<user_id>}:{<t>}
--           at KEYS[2i] and revoked:{<user_id>}:{<t>} at KEYS[2i + 1]
-- ARGV[1]   how long a marker outlives its session, in ms
-- ARGV[2]   SESSION_TTL_MAX in ms: the marker's base for a session key without
--           a TTL (never written by this server)
-- ARGV[3..] token ids, as read from the index just before the call
-- Returns   how many of them were live (their key still existed).
local grace = tonumber(ARGV[1])
local longest = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local marker = string.format('{"revoked_at_ms":%.0f,"reason":"signed_out_everywhere"}', now)
local revoked = 0
for i = 1, #ARGV - 2 do
  local session, tomb = KEYS[2 * i], KEYS[2 * i + 1]
  local left = redis.call('PTTL', session)
  redis.call('ZREM', KEYS[1], ARGV[i + 2])
  if left == -1 then
    left = longest
  end
  if left >= 0 then
    redis.call('DEL', session)
    redis.call('SET', tomb, marker, 'PX', left + grace)
    revoked = revoked + 1
  end
end
return revoked
