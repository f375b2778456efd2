-- Creates one session, enforcing the per-user cap and revocation finality
-- atomically.
-- KEYS[1]   session:{<user_id>}:{<token_id>}   the new session
-- KEYS[2]   user_sessions:{<user_id>}          the user's index: token ids scored by expiry (ms)
-- KEYS[3]   revoked:{<user_id>}:{<token_id>}   the new token's revocation marker, if any
-- KEYS[4]   reservations:{<user_id>}           token ids scored by the latest end (ms) a
--                                              claim may give their reservation
--                                              (prepare_create.lua)
-- KEYS[5]   family:{<user_id>}:{<family_id>}   the family this session starts
--                                              (store/families.rs)
-- KEYS[6..] for each ARGV[12..] in order, two keys: its session:{<user_id>}:{<t>}
--           and its revoked:{<user_id>}:{<t>} (the index members the caller
--           declared: eviction may only touch these)
-- ARGV[1]   token id
-- ARGV[2]   ttl in ms
-- ARGV[3]   MAX_SESSIONS_PER_USER
-- ARGV[4]   policy: 'evict_oldest' or 'reject'
-- ARGV[5]   the session JSON without its closing brace and timestamps:
--           {"user_id":..,"token_id":..,"metadata":{..},"family_id":..
-- ARGV[6]   how much longer a token's reservation lives than the ttl asked for,
--           in ms (claim_token used ttl + this); markers outlive sessions by it
-- ARGV[7]   SESSION_TTL_MAX in ms: a marker's base for a session key without a
--           TTL (never written by this server)
-- ARGV[8]   the revocation channel: each evicted session is published on it
--           as `r:<revoked_at_ms>:evicted:<user_id>:<token_id>` (store/revocations.rs)
-- ARGV[9]   the user id
-- ARGV[10]  the latest time, ms by this master's clock, the session may be
--           created: when prepare_create.lua ran plus REDIS_TIMEOUT_MS. The
--           claim ran after that first step and made the reservation last
--           ttl + ARGV[6] (OWNER_GRACE + REDIS_TIMEOUT_MS), so a session
--           created by then ends at least OWNER_GRACE before the reservation;
--           and a create whose caller was told it failed cannot land later
-- ARGV[11]  the family's absolute lifetime in ms: the session ends no later
--           than now + this
-- ARGV[12..] token ids of declared index members, matching KEYS[6..]
-- Returns {status, created_at_ms, expires_at_ms, more...}:
--   {1, created, expires, family_end, evicted...}
--                                      created; evicted lists the sessions revoked for room
--   {0, 0, 0, json}                    the token already has a live session of this
--                                      user (json), created since prepare_create.lua ran
--   {4, 0, 0}                          the token was revoked: only its marker is kept
--                                      as long as the reservation this call extended
--   {2, 0, 0}                          the cap is reached and the policy is 'reject'
--   {3, 0, 0, members...}              eviction needs more declared sessions: call
--                                      again declaring these (every current member)
--   {5, 0, 0}                          past ARGV[10]: nothing is written; start the
--                                      create again
-- Every check runs before the first write but the pruning of expired index
-- members (a change complete in itself), so a refusal changes nothing else.
local now = now_ms()
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local slack = tonumber(ARGV[6])
local longest = tonumber(ARGV[7])
-- The reservation claim_token made (before this script ran) ends at most
-- this long from now.
local reserved = ttl + slack

if redis.call('EXISTS', KEYS[3]) == 1 then
  -- Revoked since prepare_create.lua ran: the revocation took the recorded
  -- end of this claim into its marker; lengthening it to the claim's own
  -- lifetime from now costs nothing and needs no other key.
  if redis.call('PTTL', KEYS[3]) < reserved then
    redis.call('PEXPIRE', KEYS[3], reserved)
  end
  return {4, 0, 0}
end
local existing = redis.call('GET', KEYS[1])
if existing then
  -- Created by a concurrent create since prepare_create.lua ran, which
  -- recorded how long the claim may have extended the reservation.
  return {0, 0, 0, existing}
end
if now > tonumber(ARGV[10]) then
  -- The reservation might end less than OWNER_GRACE after a session created
  -- now, and the caller has been told this create failed.
  return {5, 0, 0}
end

-- Expired sessions are already gone (key TTL); they leave the index here, so
-- the count below is exact. A key still exists at the millisecond it expires.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)

local count = redis.call('ZCARD', KEYS[2])
local evicted = {}
if count >= max then
  if ARGV[4] ~= 'evict_oldest' then
    return {2, 0, 0}
  end
  local declared = {}
  for i = 12, #ARGV do
    declared[ARGV[i]] = 2 * (i - 12) + 6
  end
  -- The oldest (closest to expiry) of the sessions the caller declared: every
  -- member when its create began. Sessions created since, by concurrent
  -- creates, are not candidates, so a burst of creates converges.
  local members = redis.call('ZRANGE', KEYS[2], 0, -1)
  local need = count - max + 1
  local victims = {}
  for _, token in ipairs(members) do
    if #victims == need then
      break
    end
    if declared[token] then
      victims[#victims + 1] = token
    end
  end
  if #victims < need then
    local answer = {3, 0, 0}
    for _, t in ipairs(members) do
      answer[#answer + 1] = t
    end
    return answer
  end
  -- Published before any write, as revoke_sessions.lua: a refused PUBLISH
  -- fails the create having changed nothing.
  for _, token in ipairs(victims) do
    if redis.call('EXISTS', KEYS[declared[token]]) == 1 then
      redis.call('PUBLISH', ARGV[8],
        string.format('r:%.0f:evicted:%s:%s', now, ARGV[9], token))
    end
  end
  for _, token in ipairs(victims) do
    local k = declared[token]
    -- Each evicted session leaves a revocation marker, as revoke_sessions.lua.
    local left = redis.call('PTTL', KEYS[k])
    if left == -2 then
      redis.call('ZREM', KEYS[2], token)
    else
      end_session(KEYS[k], KEYS[k + 1], KEYS[2], KEYS[4], token, left,
        string.format('{"revoked_at_ms":%.0f,"reason":"evicted"}', now), slack, longest, now)
      evicted[#evicted + 1] = token
    end
  end
end

local family_end = now + tonumber(ARGV[11])
local expires = math.min(now + ttl, family_end)
local json = string.format('%s,"family_expires_at_ms":%.0f,"created_at_ms":%.0f,"expires_at_ms":%.0f}',
  ARGV[5], family_end, now, expires)
redis.call('SET', KEYS[1], json, 'PX', expires - now)
redis.call('ZADD', KEYS[2], expires, ARGV[1])
-- The index lives exactly as long as its newest member.
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], newest[2])
-- The family: its current token, none before it, its absolute end; it lives
-- as long as its current session can (rotate and extend move it along).
redis.call('HSET', KEYS[5], 'cur', ARGV[1], 'prev', '', 'rot', '0', 'end',
  string.format('%.0f', family_end))
redis.call('PEXPIREAT', KEYS[5], expires)

local answer = {1, now, expires, family_end}
for _, t in ipairs(evicted) do
  answer[#answer + 1] = t
end
return answer
