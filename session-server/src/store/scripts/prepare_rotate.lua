-- The first step of a rotation, in the user's slot: decides what the
-- presented token is to its family, answers every outcome but a rotation by
-- itself, and for a rotation records the successor's reservation end before
-- its claim (as prepare_create.lua does for a create).
-- KEYS[1]  family:{<user_id>}:{<family_id>}   hash: cur, prev, rot (ms), end (ms),
--                                             pend (the successor a rotation under
--                                             way claims, set here)
-- KEYS[2]  session:{<user_id>}:{<current>}     the session of ARGV[2]
-- KEYS[3]  revoked:{<user_id>}:{<current>}     its revocation marker
-- KEYS[4]  session:{<user_id>}:{<new>}         the successor's session, if any
-- KEYS[5]  revoked:{<user_id>}:{<new>}         the successor's marker, if any
-- KEYS[6]  reservations:{<user_id>}            as in prepare_create.lua
-- KEYS[7]  user_sessions:{<user_id>}           the user's index
-- ARGV[1]  the presented token id
-- ARGV[2]  the token id the caller believes current (the presented one at
--          first; the family's current one when this step asked for it)
-- ARGV[3]  the successor's token id
-- ARGV[4]  the claim's reservation lifetime in ms (ttl plus the slack)
-- ARGV[5]  the claim's window in ms (as prepare_create.lua's ARGV[3])
-- ARGV[6]  ROTATION_GRACE_MS
-- ARGV[7]  how much longer a marker lives than its session, in ms
-- ARGV[8]  SESSION_TTL_MAX in ms (a marker's base for a session without a TTL)
-- ARGV[9]  the revocation channel
-- ARGV[10] the user id
-- Returns {status, now_ms, more...}:
--   {1, now, json}  the presented token is the family's live current session
--                   (json): the successor's claim may proceed, deadline now + ARGV[5]
--   {2, now, json}  the presented token was rotated less than the grace ago:
--                   json is the family's current session; nothing written
--   {3, now, cur}   the family's current token is cur, not ARGV[2]: call again
--                   with it (its keys must be declared); nothing written
--   {4, now}        reuse: the family's current session is revoked (published
--                   as reuse_detected) and the family deleted
--   {5, now}        no live family: nothing written
--   {6, now}        the successor's token id has a session or a marker in
--                   this user's slot, or a reservation this family's rotation
--                   did not make: nothing written
local now = now_ms()
local family = redis.call('HMGET', KEYS[1], 'cur', 'prev', 'rot')
local cur, prev, rot = family[1], family[2], tonumber(family[3])
if not cur then
  return {5, now}
end
if cur ~= ARGV[2] then
  return {3, now, cur}
end
-- The family lives as long as its current session: expired (idle too long,
-- or past the family's end) or ended by a revocation, nothing is left of it.
local current = redis.call('GET', KEYS[2])
if not current then
  return {5, now}
end
if ARGV[1] == cur then
  if redis.call('EXISTS', KEYS[4], KEYS[5]) > 0 then
    return {6, now}
  end
  -- A token id this user reserved before (a session of it that expired, a
  -- create or rotation that claimed it) is taken too, unless this family's
  -- own rotation to it is under way (a retry of it): `pend`.
  if redis.call('ZSCORE', KEYS[6], ARGV[3]) and redis.call('HGET', KEYS[1], 'pend') ~= ARGV[3] then
    return {6, now}
  end
  redis.call('HSET', KEYS[1], 'pend', ARGV[3])
  record_claim(KEYS[6], ARGV[3], now, tonumber(ARGV[5]), tonumber(ARGV[4]))
  return {1, now, current}
end
if ARGV[1] == prev and now - rot < tonumber(ARGV[6]) then
  return {2, now, current}
end

-- Reuse: the presented token is neither the current one nor the previous
-- one within the grace. The family's session ends as revoke_sessions.lua
-- ends one: published before any write, then ended with its marker.
redis.call('PUBLISH', ARGV[9], string.format('r:%.0f:reuse_detected:%s:%s', now, ARGV[10], cur))
end_session(KEYS[2], KEYS[3], KEYS[7], KEYS[6], cur, redis.call('PTTL', KEYS[2]),
  string.format('{"revoked_at_ms":%.0f,"reason":"reuse_detected"}', now),
  tonumber(ARGV[7]), tonumber(ARGV[8]), now)
redis.call('DEL', KEYS[1])
return {4, now}
