-- Counts one login attempt in a fixed window; the counter and its TTL are set
-- together, so a counter is never left without one.
-- KEYS[1]  rate_limit:login:{<ip>}
-- ARGV[1]  RATE_LIMIT_WINDOW in ms
-- Returns  {attempts in the window, ms left in the window}
local attempts = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {attempts, left}
