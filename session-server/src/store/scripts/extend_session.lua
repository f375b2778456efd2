-- The last step of ExtendSession, in the user's slot: sets the live session's
-- expiry to now + ttl, never past its family's end, and moves its index entry
-- and (when it is its family's current session) the family's expiry with it.
-- KEYS[1]  session:{<user_id>}:{<token_id>}
-- KEYS[2]  user_sessions:{<user_id>}
-- KEYS[3]  family:{<user_id>}:{<family_id>}   absent for a session without a family
-- ARGV[1]  token id
-- ARGV[2]  the ttl asked for, in ms
-- ARGV[3]  the latest time, ms by this master's clock, the expiry may be set:
--          when prepare_extend.lua ran plus REDIS_TIMEOUT_MS
-- ARGV[4]  the latest expiry allowed, ms, or 0 for none: the session's expiry
--          when the token's reservation was not extended (a shortening)
-- ARGV[5]  the revocation channel
-- ARGV[6]  user id (for the channel message)
-- Returns {status, json}:
--   {0}        no live session: nothing written
--   {1, json}  done: json is the session as stored now
--   {7}        past ARGV[3]: nothing written
local now = now_ms()
local json = redis.call('GET', KEYS[1])
if not json then
  return {0}
end
if now > tonumber(ARGV[3]) then
  return {7}
end
local target = now + tonumber(ARGV[2])
local family_end = tonumber(string.match(json, '"family_expires_at_ms":(%d+)'))
if family_end and family_end < target then
  target = family_end
end
local cap = tonumber(ARGV[4])
if cap > 0 and cap < target then
  target = cap
end
if target <= now then
  -- The family's end has come: the session ends with it.
  return {0}
end
local expires = tonumber(string.match(json, '"expires_at_ms":(%d+)}$'))
if expires and target < expires then
  -- Moved earlier: caches holding the session must not answer it past the
  -- new expiry. Published before any write, as revoke_sessions.lua: a
  -- refused PUBLISH fails the script with nothing changed.
  redis.call('PUBLISH', ARGV[5], string.format('x:%.0f:%s:%s', target, ARGV[6], ARGV[1]))
end
local updated, found = string.gsub(json, '"expires_at_ms":%d+}$',
  string.format('"expires_at_ms":%.0f}', target), 1)
if found ~= 1 then
  return redis.error_reply('ERR the stored session has no expires_at_ms at its end')
end
redis.call('SET', KEYS[1], updated, 'PX', target - now)
redis.call('ZADD', KEYS[2], target, ARGV[1])
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], newest[2])
if KEYS[3] and redis.call('HGET', KEYS[3], 'cur') == ARGV[1] then
  redis.call('PEXPIREAT', KEYS[3], target)
end
return {1, updated}
