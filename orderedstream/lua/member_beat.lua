-- member_beat: a member of a topic's consumer group says it is alive, and learns who else is.
-- Members expire on the server's clock: a member not renewed within its TTL is dropped here (by
-- whichever member beats next), with an 'expired' record on the group's timeline.
-- KEYS[1] members (sorted set: member -> expiry, server ms)
-- KEYS[2] member connections (hash: member -> "<conn id> <conn name> <server run id>")
-- KEYS[3] events (stream: the rebalance timeline, and what wakes every member)
-- ARGV[1] member   ARGV[2] ttl_ms   ARGV[3] its heartbeat connection id   ARGV[4] its name
-- ARGV[5] events MAXLEN (approximate)   ARGV[6] 'join' | 'renew' (renew: only if still a member)
-- Reply: {now_ms, run_id, joined (1 when this call added the member), member, conn, expiry_ms,
--         member, conn, expiry_ms, ...} for every live member, by expiry; 'renew' of a member
--         that is gone (expired, or ended as gone) adds nothing and replies joined = -1.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = string.format('%d', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_s)
for _, name in ipairs(expired) do
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', 'expired', 'member', name,
    'by', ARGV[1], 'ts_ms', now_s)
end
local info = redis.pcall('INFO', 'server')  -- an ACL without @dangerous denies INFO
local run_id = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local joined = 0
local present = redis.call('ZSCORE', KEYS[1], ARGV[1])
if present or ARGV[6] == 'join' then
  redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. run_id)
  if not present then
    joined = 1
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', 'joined',
      'member', ARGV[1], 'ts_ms', now_s)
  end
else
  joined = -1
end
local reply = {now_s, run_id, joined}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_s, '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  reply[#reply + 1] = live[i]
  reply[#reply + 1] = redis.call('HGET', KEYS[2], live[i]) or ''
  reply[#reply + 1] = live[i + 1]
end
return reply
