-- Clears an account's counter after a successful login, and moves its reset
-- epoch on, so that a give-back still in flight for an attempt counted before
-- the reset (login_account_undo.lua) finds nothing to give back. The epoch
-- outlives every bucket the deleted counter could have held: a give-back for
-- an older bucket would change nothing inside the window anyway.
-- KEYS[1]  the account's counter
-- KEYS[2]  its reset epoch, same slot
-- ARGV[1]  the epoch's TTL in ms: the counter's span, N + 1 buckets
-- Returns  1 when a counter was deleted, else 0
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
