-- acquire: take the lease if it is free, under a new fencing epoch.
-- KEYS[1] lease (string)   KEYS[2] epoch (counter)   KEYS[3] owner (hash)   KEYS[4] events (stream)
-- ARGV[1] consumer   ARGV[2] ttl_ms   ARGV[3] heartbeat connection id   ARGV[4] its client name
-- ARGV[5] host       ARGV[6] pid      ARGV[7] events stream MAXLEN (approximate)
-- Reply: {1, epoch, token}                               the caller owns the group now
--        {0, holder_token, pttl_ms, conn_id, conn_name}   someone else does
local holder = redis.call('GET', KEYS[1])
if holder then
  local conn = redis.call('HMGET', KEYS[3], 'token', 'conn_id', 'conn_name')
  local conn_id, conn_name = '', ''
  if conn[1] == holder then conn_id, conn_name = conn[2] or '', conn[3] or '' end
  return {0, holder, redis.call('PTTL', KEYS[1]), conn_id, conn_name}
end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'consumer', ARGV[1], 'epoch', epoch, 'token', token,
  'conn_id', ARGV[3], 'conn_name', ARGV[4], 'host', ARGV[5], 'pid', ARGV[6], 'since_ms', now)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*',
  'type', 'acquired', 'consumer', ARGV[1], 'epoch', epoch, 'ts_ms', now)
return {1, epoch, token}
