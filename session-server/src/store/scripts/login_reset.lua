-- Clears what one address did against one account: the pair counter, and the
-- same attempts from the address's counter, bucket by bucket. What the
-- address did against other accounts (or without naming one) stays counted.
-- HINCRBY on an existing hash keeps its TTL; a hash emptied is deleted.
-- KEYS[1]  the address's counter
-- KEYS[2]  the (address, account) pair counter, same slot
-- Returns  the number of attempts cleared
local cleared = 0
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local count = tonumber(flat[i + 1])
  cleared = cleared + count
  if redis.call('HEXISTS', KEYS[1], flat[i]) == 1 then
    if redis.call('HINCRBY', KEYS[1], flat[i], -count) <= 0 then
      redis.call('HDEL', KEYS[1], flat[i])
    end
  end
end
redis.call('DEL', KEYS[2])
return cleared
