-- Helpers shared by the store's scripts: `Scripts::load` (store/mod.rs)
-- puts this file in front of each script, so each fact below is written once.
-- They take every key as an argument: a script still declares all it touches.

-- Redis's clock, in ms since the epoch: every time a script compares or
-- stores comes from it, never from the caller.
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Records in `reservations` (a sorted set of token ids scored by the latest
-- end, ms, a claim may give their reservation) that a claim of `token` with
-- `lifetime` ms is coming, before it can run: the end is now + 2 x `window`
-- + `lifetime`, so a claim accepted up to its deadline (now + window) by a
-- master whose clock is behind by up to a window still ends before it. GT
-- never shortens a recorded end; entries past their end are dropped, and the
-- set lives as long as its latest end.
local function record_claim(reservations, token, now, window, lifetime)
  redis.call('ZADD', reservations, 'GT', now + 2 * window + lifetime, token)
  redis.call('ZREMRANGEBYSCORE', reservations, '-inf', '(' .. now)
  local last = redis.call('ZRANGE', reservations, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', reservations, last[2])
end

-- Ends one live session early, in one step with its revocation marker
-- `marker_json` (revocation finality, store/mod.rs): the marker lives as long
-- as the session had left (`left`, its PTTL; `longest` for a key without a
-- TTL, never written by this server) plus `slack`, or until the latest end
-- recorded for its token's reservation, whichever is later. Deletions come
-- first: once a script has written, Redis lets it finish even past
-- maxmemory, so a revocation is never half done for want of memory.
local function end_session(session, marker, index, reservations, token, left, marker_json, slack, longest, now)
  if left == -1 then
    left = longest
  end
  local keep = math.max(left, 0) + slack
  local floor = redis.call('ZSCORE', reservations, token)
  if floor then
    keep = math.max(keep, tonumber(floor) - now)
    redis.call('ZREM', reservations, token)
  end
  redis.call('ZREM', index, token)
  redis.call('DEL', session)
  redis.call('SET', marker, marker_json, 'PX', keep)
end


-- The login limits' sliding-window counters (store/login.rs): each is a hash
-- of bucket index (decimal, never Lua's %.14g form) -> allowed attempts, over
-- buckets of `b` ms; an attempt at `now` is allowed when fewer than `limit`
-- allowed attempts lie in buckets floor(now/b)-n .. floor(now/b), a span that
-- covers every instant of (now - window, now]. Refused attempts are not
-- counted. With `take`, an allowed attempt is counted in every counter of
-- `counters` (a subject's, then any that count it too, same slot), fields of
-- buckets that left the span are deleted, and each counter gets the TTL until
-- its newest bucket leaves the span; without, nothing is written.
-- Returns 1 if allowed else 0, the allowed attempts in the span before this
-- one, ms until an attempt would be allowed (0 when allowed), and the bucket.
local function window_attempt(counters, b, n, limit, take, now)
  local bucket = math.floor(now / b)
  local oldest = bucket - n
  local counts = {}
  local sum = 0
  local flat = redis.call('HGETALL', counters[1])
  for i = 1, #flat, 2 do
    local index = tonumber(flat[i])
    if index < oldest then
      if take then redis.call('HDEL', counters[1], flat[i]) end
    else
      local count = tonumber(flat[i + 1])
      counts[index] = count
      sum = sum + count
    end
  end
  if sum < limit then
    if take then
      local field = string.format('%d', bucket)
      local ttl = (bucket + n + 1) * b - now
      for k = 1, #counters do
        if k > 1 then
          for _, old in ipairs(redis.call('HKEYS', counters[k])) do
            if tonumber(old) < oldest then redis.call('HDEL', counters[k], old) end
          end
        end
        redis.call('HINCRBY', counters[k], field, 1)
        redis.call('PEXPIRE', counters[k], ttl)
      end
    end
    return 1, sum, 0, bucket
  end
  -- Refused: the next attempt is allowed once enough of the oldest buckets
  -- have left the span; bucket k leaves it when bucket k + n + 1 begins.
  local left = sum
  for k = oldest, bucket do
    left = left - (counts[k] or 0)
    if left < limit then
      return 0, sum, (k + n + 1) * b - now, bucket
    end
  end
  return 0, sum, (bucket + n + 1) * b - now, bucket
end
