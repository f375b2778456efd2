-- Forgets every device of an account: each of its tokens is untrusted from
-- now on. The devices' counters are left to expire within a window: no
-- token that could reach them is trusted again.
-- KEYS[1]  the account's devices: sorted set of token hash -> expiry (ms)
-- KEYS[2]  the account's device refusals
-- Returns  the number of unexpired devices forgotten
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local live = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
redis.call('DEL', KEYS[1], KEYS[2])
return live
