-- Counts a user's live sessions by Redis's clock.
-- KEYS[1]  user_sessions:{<user_id>}
-- Returns  the number of members whose expiry is not yet past.
local now = now_ms()
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
