-- acquire: take the lease if it is free, under a new fencing epoch and a new token.
-- KEYS[1] lease (string)   KEYS[2] epoch (string: the last epoch handed out)
-- KEYS[3] owner (hash)     KEYS[4] events (stream)
-- ARGV[1] consumer   ARGV[2] ttl_ms   ARGV[3] heartbeat connection id   ARGV[4] its client name
-- ARGV[5] host       ARGV[6] pid      ARGV[7] events stream MAXLEN (approximate)
-- ARGV[8] nonce (random, per acquisition)
-- Reply: {1, epoch, token, server_changed}                  the caller owns the group now
--        {0, holder_token, pttl_ms, conn_id, conn_name}      someone else does
--
-- The epoch is max(last epoch + 1, the server's clock in microseconds): it grows on one server
-- even when the clock stalls, and when the counter is gone (a restart without persistence, a
-- deleted key, a promoted replica that never received the last increments) the clock still
-- carries it past every epoch handed out before, as long as the clock of the server handing out
-- the next epoch reads later than the clock of the one that handed out the last (DESIGN.md §4).
-- Epochs stay below 2^53 (exact in Lua's doubles and in JSON) until the year 2255.
-- The token "consumer:epoch:nonce" is unique per acquisition even if an epoch ever repeated.
-- server_changed is 1 when the previous term was granted by another server process (run_id
-- recorded in the owner hash: a restart, or a promoted replica), so its acks may be lost; also
-- when that cannot be told (INFO denied by an ACL, no owner record).  0 for a first term.
-- A lease without expiry (SET without PX, PERSIST) is given the configured TTL here, so it is
-- held for at most one TTL more and standbys wait instead of spinning.
local holder = redis.call('GET', KEYS[1])
if holder then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    pttl = tonumber(ARGV[2])
  end
  local conn = redis.call('HMGET', KEYS[3], 'token', 'conn_id', 'conn_name')
  local conn_id, conn_name = '', ''
  if conn[1] == holder then conn_id, conn_name = conn[2] or '', conn[3] or '' end
  return {0, holder, pttl, conn_id, conn_name}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local next_epoch = math.max(last + 1, now_us)
if next_epoch > 9007199254740991 then  -- 2^53 - 1: past it, doubles skip integers
  return redis.error_reply('EPOCHRANGE the next epoch would pass 2^53 (counter ' .. KEYS[2] ..
    ' = ' .. string.format('%.0f', last) .. ', server clock ' .. string.format('%.0f', now_us) ..
    ' us): a counter set by hand can be deleted (the clock carries the next epoch past every ' ..
    'earlier one); a server clock that far ahead must be corrected')
end
local epoch = string.format('%d', next_epoch)
local info = redis.pcall('INFO', 'server')  -- an ACL without @dangerous denies INFO
local run_id = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local before = redis.call('HGET', KEYS[3], 'run_id')
local changed = 0
if last > 0 and (run_id == '' or before ~= run_id) then changed = 1 end  -- unknown: changed
local token = ARGV[1] .. ':' .. epoch .. ':' .. ARGV[8]
redis.call('SET', KEYS[2], epoch)
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
local now = string.format('%d', math.floor(now_us / 1000))
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'consumer', ARGV[1], 'epoch', epoch, 'token', token,
  'conn_id', ARGV[3], 'conn_name', ARGV[4], 'host', ARGV[5], 'pid', ARGV[6], 'since_ms', now,
  'run_id', run_id)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*',
  'type', 'acquired', 'consumer', ARGV[1], 'epoch', epoch, 'ts_ms', now)
return {1, epoch, token, changed}
