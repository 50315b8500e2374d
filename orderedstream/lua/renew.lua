-- renew: extend the lease only if the caller still holds it (compare-and-PEXPIRE).
-- KEYS[1] lease   KEYS[2] owner (hash)
-- ARGV[1] token   ARGV[2] ttl_ms   ARGV[3] heartbeat connection id (it changes on reconnect)
-- Reply: 1 renewed, 0 the caller no longer holds the lease
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], 'conn_id') ~= ARGV[3] then
  redis.call('HSET', KEYS[2], 'conn_id', ARGV[3])
end
return 1
