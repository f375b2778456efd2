-- Revokes a set of one user's sessions: those in the index when the caller read it.
-- KEYS[1]   user_sessions:{<user_id>}
-- KEYS[2..] session:{<user_id>}:{<token_id>} for each ARGV[i], KEYS[i + 1]
-- ARGV[1..] token ids, as read from the index just before the call
-- Returns   how many of them were live (their key still existed).
local revoked = 0
for i = 1, #ARGV do
  revoked = revoked + redis.call('DEL', KEYS[i + 1])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return revoked
