-- Creates one session, enforcing the per-user cap atomically.
-- KEYS[1]   session:{<user_id>}:{<token_id>}   the new session
-- KEYS[2]   user_sessions:{<user_id>}          the user's index: token ids scored by expiry (ms)
-- KEYS[3..] session keys of eviction candidates, one per ARGV[7..]
-- ARGV[1]   token id
-- ARGV[2]   ttl in ms
-- ARGV[3]   MAX_SESSIONS_PER_USER
-- ARGV[4]   policy: 'evict_oldest' or 'reject'
-- ARGV[5]   the session JSON without its closing brace and timestamps:
--           {"user_id":..,"token_id":..,"metadata":{..}
-- ARGV[6..] token ids of eviction candidates, matching KEYS[3..]
-- Returns {status, created_at_ms, expires_at_ms, token ids...}:
--   {1, created, expires, evicted...}  created; evicted lists the sessions revoked for room
--   {0, 0, 0}                          the token already has a live session: nothing changed
--   {2, 0, 0}                          the cap is reached and the policy is 'reject'
--   {3, 0, 0, victims...}              eviction must delete these sessions, which were
--                                      not declared in KEYS: call again declaring them
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])

-- Expired sessions are already gone (key TTL); drop them from the index too, so
-- the count below is exact. A key still exists at the millisecond it expires.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, 0, 0}
end

local evicted = {}
local count = redis.call('ZCARD', KEYS[2])
if count >= max then
  if ARGV[4] ~= 'evict_oldest' then
    return {2, 0, 0}
  end
  -- The oldest sessions are those closest to expiry.
  local victims = redis.call('ZRANGE', KEYS[2], 0, count - max)
  local declared = {}
  for i = 6, #ARGV do
    declared[ARGV[i]] = KEYS[i - 3]
  end
  for _, token in ipairs(victims) do
    if not declared[token] then
      local answer = {3, 0, 0}
      for _, t in ipairs(victims) do
        answer[#answer + 1] = t
      end
      return answer
    end
  end
  for _, token in ipairs(victims) do
    redis.call('DEL', declared[token])
    redis.call('ZREM', KEYS[2], token)
    evicted[#evicted + 1] = token
  end
end

local expires = now + ttl
local json = string.format('%s,"created_at_ms":%.0f,"expires_at_ms":%.0f}', ARGV[5], now, expires)
redis.call('SET', KEYS[1], json, 'PX', ttl)
redis.call('ZADD', KEYS[2], expires, ARGV[1])
-- The index lives exactly as long as its newest member.
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], newest[2])

local answer = {1, now, expires}
for _, t in ipairs(evicted) do
  answer[#answer + 1] = t
end
return answer
