-- Gives back one attempt that login_device_attempt.lua counted for an account
-- (its token untrusted) when the address's limit, on another slot, refused
-- it. The reset epoch is the proof that the attempt is still counted: a reset
-- of the account (login_account_reset.lua) that ran in between deleted the
-- counter, this attempt with it, and moved the epoch on; a decrement then
-- would erase an attempt made after the reset. Only decrements: a bucket that
-- is gone stays gone, and no key is created.
-- KEYS[1]  the account's counter
-- KEYS[2]  its reset epoch, same slot
-- ARGV[1]  the bucket index login_device_attempt.lua returned
-- ARGV[2]  the epoch it returned
-- Returns  1 when the attempt was given back, 0 when it was no longer counted
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[2]) then
  return 0
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
