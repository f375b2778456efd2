-- Publishes one heartbeat of this process on the revocation channel with
-- Redis's clock appended (store/revocations.rs): the time is read and the
-- message published in one atomic step, so the time a heartbeat carries is
-- this master's clock at the moment it left Redis. Run with EVAL, routed to
-- one master (it touches no key).
-- KEYS      none
-- ARGV[1]   the revocation channel
-- ARGV[2]   the heartbeat without its time: `h:<instance>:<seq>:<master index>`
-- Returns   PUBLISH's reply: how many subscribers received it
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return redis.call('PUBLISH', ARGV[1], string.format('%s:%.0f', ARGV[2], now))
