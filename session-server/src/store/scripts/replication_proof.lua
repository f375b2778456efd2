-- The replication wait's one write (store/replication.rs): renews the expiry
-- of the proof a revocation's connection wrote after the revocation, only
-- where that proof exists. The write sets this connection's replication
-- offset past the revocation for the `WAIT` that follows; a master without
-- the proof (not the one that ran the revocation: a failover under way)
-- answers 0 and nothing is written, so the wait fails closed.
-- KEYS[1]  the proof: replicated:{user}:<random>
-- ARGV[1]  its new TTL in ms
-- Returns  1 when the proof was there and renewed, else 0
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then
  return 1
end
return 0
