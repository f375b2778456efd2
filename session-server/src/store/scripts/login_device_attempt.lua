-- Counts one login attempt that presents a device token. When the token is
-- one of the account's unexpired devices, the attempt counts against that
-- device's own counter alone. Otherwise it is untrusted and counts against
-- the account's shared counter, as an attempt without a token would; the
-- caller then takes it from the address, and gives the account's attempt
-- back (login_account_undo.lua) if the address refuses. Both counters are
-- lib.lua's `window_attempt`. A device's refused attempt is not counted in
-- its window but adds one to the device's refusals, which never reset; at
-- `lockout` refusals the device is forgotten (untrusted from then on).
-- KEYS[1]  the account's devices: sorted set of token hash -> expiry (ms)
-- KEYS[2]  the account's device refusals: hash of token hash -> refusals
-- KEYS[3]  this device's counter: hash of bucket index -> allowed attempts
-- KEYS[4]  the account's counter (login_attempt.lua's, for the account)
-- KEYS[5]  the account counter's reset epoch (login_account_reset.lua)
-- ARGV[1]  the presented token's hash
-- ARGV[2]  B, the bucket length in ms
-- ARGV[3]  N, buckets per window
-- ARGV[4]  the device's limit
-- ARGV[5]  refusals after which the device is forgotten
-- ARGV[6]  the account's limit
-- Returns  {1 if trusted else 0, 1 if allowed else 0, allowed attempts in
--           the span before this one, ms until an attempt would be allowed
--           (0 when allowed), Redis time in ms, the bucket index the attempt
--           was counted in, the account's reset epoch (0 when trusted)}
local now = now_ms()
local b = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  local allowed, before, retry, bucket = window_attempt({KEYS[4]}, b, n, tonumber(ARGV[6]), true, now)
  return {0, allowed, before, retry, now, bucket, tonumber(redis.call('GET', KEYS[5]) or '0')}
end

local allowed, before, retry, bucket = window_attempt({KEYS[3]}, b, n, tonumber(ARGV[4]), true, now)
if allowed == 0 then
  local refusals = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  if refusals >= tonumber(ARGV[5]) then
    -- OWASP's permanent device lockout: the token is untrusted for good.
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('DEL', KEYS[3])
  else
    -- The refusals live as long as the newest device (the set's own TTL).
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
return {1, allowed, before, retry, now, bucket, 0}
