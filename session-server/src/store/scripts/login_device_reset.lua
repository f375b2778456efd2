-- After a successful login, for one account: clears the presented device's
-- counter when the device is trusted, and issues a new device token (its
-- hash) when asked. A trusted device presented with an issue is replaced by
-- the new one, which keeps its refusals. Issuing drops expired devices and
-- then the soonest to expire while the account holds more than `max`.
-- KEYS[1]  the account's devices: sorted set of token hash -> expiry (ms)
-- KEYS[2]  the account's device refusals: hash of token hash -> refusals
-- KEYS[3]  optional: the presented device's counter
-- ARGV[1]  the presented token's hash, or '' when none was presented
-- ARGV[2]  the new token's hash, or '' when none is to be issued
-- ARGV[3]  the new token's lifetime in ms
-- ARGV[4]  max, the devices an account keeps
-- Returns  {1 if the presented device is trusted else 0,
--           1 if its counter held attempts else 0,
--           the devices forgotten to stay within max}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local presented = ARGV[1]
local trusted = 0
local cleared = 0
if presented ~= '' then
  local expiry = redis.call('ZSCORE', KEYS[1], presented)
  if expiry and tonumber(expiry) > now then
    trusted = 1
    cleared = redis.call('DEL', KEYS[3])
  end
end

local forgotten = 0
if ARGV[2] ~= '' then
  local ttl = tonumber(ARGV[3])
  local max = tonumber(ARGV[4])
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    redis.call('ZREM', KEYS[1], gone)
    redis.call('HDEL', KEYS[2], gone)
  end
  local refusals = false
  if trusted == 1 then
    refusals = redis.call('HGET', KEYS[2], presented)
    redis.call('ZREM', KEYS[1], presented)
    redis.call('HDEL', KEYS[2], presented)
  end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  if refusals then redis.call('HSET', KEYS[2], ARGV[2], refusals) end
  while redis.call('ZCARD', KEYS[1]) > max do
    local oldest = redis.call('ZPOPMIN', KEYS[1])
    redis.call('HDEL', KEYS[2], oldest[1])
    forgotten = forgotten + 1
  end
  -- Both keys live as long as the device that expires last.
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local keep = math.max(ttl, tonumber(newest[2]) - now)
  redis.call('PEXPIRE', KEYS[1], keep)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], keep) end
end
return {trusted, cleared, forgotten}
