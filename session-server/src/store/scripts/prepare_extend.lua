-- The first step of ExtendSession, in the user's slot: decides whether the
-- expiry moves at all (the throttle), and when it moves later, records the
-- token's new reservation end before the claim that extends the reservation
-- (as prepare_create.lua does for a create).
-- KEYS[1]  session:{<user_id>}:{<token_id>}
-- KEYS[2]  reservations:{<user_id>}   as in prepare_create.lua
-- ARGV[1]  token id
-- ARGV[2]  the ttl asked for, in ms
-- ARGV[3]  the claim's reservation lifetime in ms (the ttl plus the slack)
-- ARGV[4]  the claim's window in ms (as prepare_create.lua's ARGV[3])
-- Returns {status, now_ms, json}:
--   {0, now}        no live session: nothing written
--   {1, now, json}  the expiry would move by a tenth of the ttl or less:
--                   nothing written, json is the session as it is
--   {2, now, json}  the expiry moves later: recorded, the claim may proceed
--   {3, now, json}  the expiry moves earlier: no claim is needed
local now = now_ms()
local json = redis.call('GET', KEYS[1])
if not json then
  return {0, now}
end
local ttl = tonumber(ARGV[2])
local expires = tonumber(string.match(json, '"expires_at_ms":(%d+)}$'))
local target = now + ttl
local family_end = tonumber(string.match(json, '"family_expires_at_ms":(%d+)'))
if family_end and family_end < target then
  target = family_end
end
if not expires or math.abs(target - expires) * 10 <= ttl then
  return {1, now, json}
end
if target < expires then
  return {3, now, json}
end
record_claim(KEYS[2], ARGV[1], now, tonumber(ARGV[4]), tonumber(ARGV[3]))
return {2, now, json}
