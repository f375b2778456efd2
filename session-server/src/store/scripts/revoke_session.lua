-- Revokes one session and removes it from its user's index.
-- KEYS[1]  session:{<user_id>}:{<token_id>}
-- KEYS[2]  user_sessions:{<user_id>}
-- ARGV[1]  token id
-- Returns  1 when a live session was revoked, 0 when there was none.
local revoked = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return revoked
