-- Reserves a token id for one user, so token ids stay unique across users and
-- token-only lookups can find the owner.
-- KEYS[1]  token_owner:{<token_id>}   the reservation, holding the owner's user id
-- ARGV[1]  user id
-- ARGV[2]  reservation lifetime in ms: the ttl asked for plus a slack covering
--          the time until the create script runs and a grace period after it
-- Returns  1 when the token is reserved for ARGV[1] (new or already), 0 when
--          another user holds it.
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if owner == ARGV[1] then
  -- Only ever extend: a reservation must outlive every session of its token.
  local ttl = tonumber(ARGV[2])
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return 1
end
return 0
