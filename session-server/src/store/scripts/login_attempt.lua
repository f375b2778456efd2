-- Counts one login attempt against one subject (an address or an account) if
-- the subject is under its limit: a sliding-window counter over N+1 buckets
-- of B ms (B = ceil(window / N)). The attempt at Redis time `now` is allowed
-- when fewer than `limit` allowed attempts lie in buckets floor(now/B)-N ..
-- floor(now/B); that span covers every instant of (now - window, now], so no
-- window-long interval ever holds more than `limit` allowed attempts.
-- Refused attempts are not counted. Fields of buckets that left the span are
-- deleted, so a counter holds at most N+1 fields, and every key written gets
-- the TTL until its newest bucket leaves the span.
-- KEYS[1]  the subject's counter: hash of bucket index -> allowed attempts
-- KEYS[2]  optional, same slot: the (address, account) pair counter, bumped
--          in the same bucket when the attempt is allowed
-- ARGV[1]  B, the bucket length in ms
-- ARGV[2]  N, buckets per window
-- ARGV[3]  the limit
-- ARGV[4]  'take' counts an allowed attempt; 'peek' only answers (read-only)
-- Returns  {1 if allowed else 0, allowed attempts in the span before this one,
--           ms until an attempt would be allowed (0 when allowed),
--           the bucket index the attempt was counted in, Redis time in ms}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local b = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local take = ARGV[4] == 'take'
local bucket = math.floor(now / b)
local oldest = bucket - n
-- Hash fields are the bucket index in decimal (never Lua's %.14g form).
local field = string.format('%d', bucket)

local counts = {}
local sum = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local index = tonumber(flat[i])
  if index < oldest then
    if take then redis.call('HDEL', KEYS[1], flat[i]) end
  else
    local count = tonumber(flat[i + 1])
    counts[index] = count
    sum = sum + count
  end
end

if sum < limit then
  if take then
    local ttl = (bucket + n + 1) * b - now
    for k = 1, #KEYS do
      if k > 1 then
        for _, old in ipairs(redis.call('HKEYS', KEYS[k])) do
          if tonumber(old) < oldest then redis.call('HDEL', KEYS[k], old) end
        end
      end
      redis.call('HINCRBY', KEYS[k], field, 1)
      redis.call('PEXPIRE', KEYS[k], ttl)
    end
  end
  return {1, sum, 0, bucket, now}
end

-- Refused: the next attempt is allowed once enough of the oldest buckets have
-- left the span; bucket k leaves it when bucket k + N + 1 begins.
local retry = (bucket + n + 1) * b - now
local left = sum
for k = oldest, bucket do
  left = left - (counts[k] or 0)
  if left < limit then
    retry = (k + n + 1) * b - now
    break
  end
end
return {0, sum, retry, bucket, now}
