-- Publishes one heartbeat of this process on the revocation channel with
-- Redis's clock appended (store/revocations.rs): the time is read and the
-- message published in one atomic step, so the time a heartbeat carries is
-- this master's clock at the moment it left Redis. Run with EVAL, routed to
-- one master (it touches no key).
-- KEYS      none
-- ARGV[1]   the revocation channel
-- ARGV[2]   the heartbeat without its time: `h:<instance>:<seq>:<master index>`
-- ARGV[3]   `1`: publish only if this node is a master now (a cluster: a
--           master demoted by a failover still takes the beat, and a beat
--           that came back from it would vouch for a subscription that no
--           longer hears its slots' revocations first-hand); `0`: publish
--           (standalone and sentinel, whose server may be pointed at a
--           replica on purpose)
--           A Redis user that may not run INFO (it is in @dangerous) gets
--           the beat without the check, as before it existed: the stream
--           then moves after a graceful failover only once redis-rs learns
--           of it (README, "Redis requirements": without `+info`).
-- Returns   PUBLISH's reply (how many subscribers received it), or -1 when
--           ARGV[3] is `1` and this node is not a master: nothing published
if ARGV[3] == '1' then
  local info = redis.pcall('INFO', 'replication')
  if type(info) == 'string' and string.match(info, 'role:(%a+)') ~= 'master' then
    return -1
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return redis.call('PUBLISH', ARGV[1], string.format('%s:%.0f', ARGV[2], now))
