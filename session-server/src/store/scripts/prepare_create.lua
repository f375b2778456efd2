-- The first step of a create, in the user's slot, before the token's claim:
-- answers a replay without touching the token's reservation, and otherwise
-- records how long the claim that follows may make the reservation last, so
-- that a revocation always knows it (revocation finality: a marker lives at
-- least as long as every reservation of its token, see store/mod.rs).
-- KEYS[1]  session:{<user_id>}:{<token_id>}   the session, if it exists
-- KEYS[2]  revoked:{<user_id>}:{<token_id>}   the token's revocation marker, if any
-- KEYS[3]  reservations:{<user_id>}           token ids scored by the latest end (ms,
--                                             this clock) a claim may give their
--                                             reservation
-- ARGV[1]  token id
-- ARGV[2]  the claim's reservation lifetime in ms (the ttl asked for plus the slack)
-- ARGV[3]  the claim's window in ms: claim_token refuses to run after now + this,
--          by its own master's clock
-- Returns {status, now_ms, more...}:
--   {4, now}        the token was revoked: nothing is claimed or written
--   {0, now, json}  the token already has a live session of this user (a replay):
--                   nothing is claimed or written
--   {1, now}        recorded: the claim may proceed, with deadline now + ARGV[3]
-- The recorded end is now + 2 x window + lifetime: a claim accepted up to the
-- deadline by a master whose clock is behind this one's by up to a window
-- still ends before it.
local now = now_ms()
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {4, now}
end
local existing = redis.call('GET', KEYS[1])
if existing then
  return {0, now, existing}
end
record_claim(KEYS[3], ARGV[1], now, tonumber(ARGV[3]), tonumber(ARGV[2]))
return {1, now}
