-- Gives back one attempt that login_attempt.lua counted for an address and an
-- account, when the account's limit (on another slot) refused it. The pair
-- counter is the proof that the attempt is still counted: a reset with the
-- account (login_reset.lua) that ran in between already took the pair's
-- attempts, this one included, off the address's counter and deleted the pair,
-- and then there is nothing to give back. Without that proof a late give-back
-- would erase an attempt the address made against another account. Only
-- decrements: a bucket that is gone stays gone, and no key is created.
-- KEYS[1]  the address's counter
-- KEYS[2]  the (address, account) pair counter, same slot
-- ARGV[1]  the bucket index login_attempt.lua returned
-- Returns  1 when the attempt was given back, 0 when it was no longer counted
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return 0
end
for _, key in ipairs(KEYS) do
  if redis.call('HEXISTS', key, ARGV[1]) == 1 then
    if redis.call('HINCRBY', key, ARGV[1], -1) <= 0 then
      redis.call('HDEL', key, ARGV[1])
    end
  end
end
return 1
