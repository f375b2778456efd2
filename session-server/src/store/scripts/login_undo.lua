-- Gives back one attempt that login_attempt.lua counted, when the other limit
-- of the same call (on another slot) refused it. Only decrements: a bucket
-- that is already gone (reset or expired) stays gone, and no key is created.
-- KEYS[1..]  the counters the attempt was counted in (address and pair)
-- ARGV[1]    the bucket index login_attempt.lua returned
-- Returns    the number of counters decremented
local undone = 0
for _, key in ipairs(KEYS) do
  if redis.call('HEXISTS', key, ARGV[1]) == 1 then
    undone = undone + 1
    if redis.call('HINCRBY', key, ARGV[1], -1) <= 0 then
      redis.call('HDEL', key, ARGV[1])
    end
  end
end
return undone
