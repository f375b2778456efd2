-- Counts one login attempt against one subject (an address or an account) if
-- the subject is under its limit: lib.lua's `window_attempt`, whose comment
-- says how the sliding window holds the limit in every window-long interval.
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
local now = now_ms()
local allowed, before, retry, bucket = window_attempt(KEYS, tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == 'take', now)
return {allowed, before, retry, bucket, now}
