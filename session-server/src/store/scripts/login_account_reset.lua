-- Clears an account's counter after a successful login, and moves its reset
-- epoch on, so that a give-back still in flight for an attempt counted before
-- the reset (login_account_undo.lua) finds nothing to give back. The epoch is
-- Redis's time in microseconds, not a count: a count would start again at 1
-- once its key expired, and a give-back that had read 1 before the expiry
-- would match the 1 of a later reset. The epoch outlives every bucket the
-- deleted counter could have held: a give-back for an older bucket would
-- change nothing inside the window anyway.
-- KEYS[1]  the account's counter
-- KEYS[2]  its reset epoch, same slot
-- ARGV[1]  the epoch's TTL in ms: the counter's span, N + 1 buckets
-- Returns  1 when a counter was deleted, else 0
local time = redis.call('TIME')
local epoch = tonumber(time[1]) * 1000000 + tonumber(time[2])
if epoch <= tonumber(redis.call('GET', KEYS[2]) or '0') then
  -- Two resets within a microsecond, or a clock that went back.
  epoch = redis.call('INCR', KEYS[2])
else
  redis.call('SET', KEYS[2], epoch)
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
