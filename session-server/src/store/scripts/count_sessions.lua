-- Counts a user's live sessions by Redis's clock.
-- KEYS[1]  user_sessions:{<user_id>}
-- Returns  the number of members whose expiry is not yet past.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
