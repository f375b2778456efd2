-- The last step of a rotation, in the user's slot: in one atomic step the
-- presented session is revoked (reason rotated, published) and its successor
-- becomes the family's live session. Runs after prepare_rotate.lua recorded
-- the successor's reservation end and claim_token.lua claimed it.
-- KEYS[1]  family:{<user_id>}:{<family_id>}   hash: cur, prev, rot (ms), end (ms)
-- KEYS[2]  session:{<user_id>}:{<presented>}
-- KEYS[3]  revoked:{<user_id>}:{<presented>}
-- KEYS[4]  session:{<user_id>}:{<new>}
-- KEYS[5]  revoked:{<user_id>}:{<new>}
-- KEYS[6]  user_sessions:{<user_id>}
-- KEYS[7]  reservations:{<user_id>}
-- ARGV[1]  the presented token id
-- ARGV[2]  the successor's token id
-- ARGV[3]  the successor's ttl in ms (cut to the family's end here)
-- ARGV[4]  the successor's JSON without its closing brace and timestamps:
--          {"user_id":..,"token_id":..,"metadata":{..},"family_id":..
-- ARGV[5]  how much longer a marker lives than its session, in ms
-- ARGV[6]  SESSION_TTL_MAX in ms (a marker's base for a session without a TTL)
-- ARGV[7]  the revocation channel
-- ARGV[8]  the user id
-- ARGV[9]  the latest time, ms by this master's clock, the successor may be
--          created: when prepare_rotate.lua ran plus REDIS_TIMEOUT_MS (as
--          create_session.lua's ARGV[10])
-- ARGV[10] ROTATION_GRACE_MS
-- ARGV[11] the family id (the rotated-away token's marker names it, so a
--          revocation following the marker revokes the successor only while
--          it is still of this family)
-- Returns {status, more...}:
--   {1, now, expires, end}  rotated
--   {2, json}               this very rotation already happened (a retry, or a
--                           concurrent one naming the same successor): json
--                           is the successor, the family's current session
--   {3, cur}                the family moved on since prepare_rotate.lua ran:
--                           ask it again with cur (nothing written)
--   {5}                     no live family, or the presented session ended
--   {6}                     the successor's token id has a session or a marker
--   {7}                     past ARGV[9]: nothing written; start again
local now = now_ms()
local family = redis.call('HMGET', KEYS[1], 'cur', 'prev', 'rot', 'end')
local cur, prev, rot, family_end = family[1], family[2], tonumber(family[3]), tonumber(family[4])
if not cur then
  return {5}
end
if cur ~= ARGV[1] then
  if cur == ARGV[2] and prev == ARGV[1] and now - rot < tonumber(ARGV[10]) then
    local json = redis.call('GET', KEYS[4])
    if json then
      return {2, json}
    end
    return {5}
  end
  return {3, cur}
end
local left = redis.call('PTTL', KEYS[2])
if left == -2 then
  return {5}
end
if redis.call('EXISTS', KEYS[4], KEYS[5]) > 0 then
  return {6}
end
if now > tonumber(ARGV[9]) then
  return {7}
end
local expires = math.min(now + tonumber(ARGV[3]), family_end)
if expires <= now then
  return {5}
end

-- Published before any write, as revoke_sessions.lua: a refused PUBLISH
-- fails the rotation having changed nothing.
redis.call('PUBLISH', ARGV[7], string.format('r:%.0f:rotated:%s:%s', now, ARGV[8], ARGV[1]))

-- The presented session ends as revoke_sessions.lua ends one, its marker
-- naming the successor (so a revocation of it can follow the family).
end_session(KEYS[2], KEYS[3], KEYS[6], KEYS[7], ARGV[1], left,
  string.format('{"revoked_at_ms":%.0f,"reason":"rotated","successor":%s,"family":%s}',
    now, cjson.encode(ARGV[2]), cjson.encode(ARGV[11])),
  tonumber(ARGV[5]), tonumber(ARGV[6]), now)

local json = string.format('%s,"family_expires_at_ms":%.0f,"created_at_ms":%.0f,"expires_at_ms":%.0f}',
  ARGV[4], family_end, now, expires)
redis.call('SET', KEYS[4], json, 'PX', expires - now)
redis.call('ZADD', KEYS[6], expires, ARGV[2])
local newest = redis.call('ZRANGE', KEYS[6], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[6], newest[2])
redis.call('HSET', KEYS[1], 'cur', ARGV[2], 'prev', ARGV[1], 'rot', string.format('%.0f', now))
redis.call('HDEL', KEYS[1], 'pend')
redis.call('PEXPIREAT', KEYS[1], expires)
return {1, now, expires, family_end}
