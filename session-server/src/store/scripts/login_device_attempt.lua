-- Counts one login attempt against a trusted device's own counter, when the
-- presented device token is one of the account's unexpired devices; answers
-- "untrusted" and writes nothing otherwise (the caller then counts the
-- attempt against the address and the account as without a token). The
-- window is login_attempt.lua's: an attempt at Redis time `now` is allowed
-- when fewer than `limit` allowed attempts lie in buckets floor(now/B)-N ..
-- floor(now/B). A refused attempt is not counted in the window but adds one
-- to the device's refusals, which never reset; at `lockout` refusals the
-- device is forgotten (untrusted from the next attempt on).
-- KEYS[1]  the account's devices: sorted set of token hash -> expiry (ms)
-- KEYS[2]  the account's device refusals: hash of token hash -> refusals
-- KEYS[3]  this device's counter: hash of bucket index -> allowed attempts
-- ARGV[1]  the presented token's hash
-- ARGV[2]  B, the bucket length in ms
-- ARGV[3]  N, buckets per window
-- ARGV[4]  the device's limit
-- ARGV[5]  refusals after which the device is forgotten
-- Returns  {1 if trusted else 0, 1 if allowed else 0, allowed attempts in
--           the span before this one, ms until an attempt would be allowed
--           (0 when allowed), Redis time in ms}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return {0, 0, 0, 0, now}
end
local b = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local lockout = tonumber(ARGV[5])
local bucket = math.floor(now / b)
local oldest = bucket - n
local field = string.format('%d', bucket)

local counts = {}
local sum = 0
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  local index = tonumber(flat[i])
  if index < oldest then
    redis.call('HDEL', KEYS[3], flat[i])
  else
    local count = tonumber(flat[i + 1])
    counts[index] = count
    sum = sum + count
  end
end

if sum < limit then
  redis.call('HINCRBY', KEYS[3], field, 1)
  redis.call('PEXPIRE', KEYS[3], (bucket + n + 1) * b - now)
  return {1, 1, sum, 0, now}
end

local refusals = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if refusals >= lockout then
  -- OWASP's permanent device lockout: the token is untrusted for good.
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
else
  -- The refusals live as long as the newest device (the set's own TTL).
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end

local retry = (bucket + n + 1) * b - now
local left = sum
for k = oldest, bucket do
  left = left - (counts[k] or 0)
  if left < limit then
    retry = (k + n + 1) * b - now
    break
  end
end
return {1, 0, sum, retry, now}
