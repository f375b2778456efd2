-- Reserves a token id for one user, so token ids stay unique across users and
-- token-only lookups can find the owner. Runs only after prepare_create.lua
-- recorded, in the user's slot, the latest end this claim may give the
-- reservation; a claim that arrives after its deadline writes nothing, so no
-- reservation ever lasts longer than the user's slot knows.
-- KEYS[1]  token_owner:{<token_id>}   the reservation, holding the owner's user id
-- ARGV[1]  user id
-- ARGV[2]  reservation lifetime in ms: the ttl asked for plus a slack covering
--          the time until the create script runs and a grace period after it
-- ARGV[3]  deadline, ms since the epoch by the clock of the user's master (from
--          prepare_create.lua): past it by this master's clock, nothing is done
-- Returns  1 when the token is reserved for ARGV[1] (new or already), 0 when
--          another user holds it, -1 when the deadline has passed.
local now = now_ms()
if now > tonumber(ARGV[3]) then
  return -1
end
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
