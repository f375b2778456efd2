-- Revokes one session: removes it and its index entry, and leaves a
-- revocation marker so that CreateSession never brings the token id back.
-- KEYS[1]  session:{<user_id>}:{<token_id>}
-- KEYS[2]  user_sessions:{<user_id>}
-- KEYS[3]  revoked:{<user_id>}:{<token_id>}
-- ARGV[1]  token id
-- ARGV[2]  how long the marker outlives the session, in ms
-- ARGV[3]  SESSION_TTL_MAX in ms: the marker's base for a session key without a
--          TTL (never written by this server; someone else's write)
-- Returns  1 when a live session was revoked, 0 when there was none (then
--          nothing is written but the removal of a stale index entry).
-- The session is deleted before the marker is written: once a script has
-- written, Redis lets it finish even past maxmemory, so a revocation is never
-- half done for want of memory.
local left = redis.call('PTTL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if left == -2 then
  return 0
elseif left < 0 then
  left = tonumber(ARGV[3])
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[3], string.format('{"revoked_at_ms":%.0f,"reason":"revoked"}', now),
  'PX', left + tonumber(ARGV[2]))
return 1
