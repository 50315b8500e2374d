-- member_leave: a member leaves a topic's consumer group (a clean stop: 'left'), or another
-- member found its heartbeat connection gone ('gone').
-- KEYS[1] members (sorted set)   KEYS[2] member connections (hash)   KEYS[3] events (stream)
-- ARGV[1] member   ARGV[2] 'left' | 'gone'   ARGV[3] who   ARGV[4] reason
-- ARGV[5] events MAXLEN (approximate)
-- ARGV[6] for 'gone': the connection record seen ("<id> <name> <run id>"); the member is removed
--         only if it still holds that record (a member that came back on a new connection is
--         left alone)
-- Reply: 1 removed, 0 not a member (or a newer connection)
if ARGV[2] == 'gone' and redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[6] then
  return 0
end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[2], 'member', ARGV[1],
  'by', ARGV[3], 'reason', ARGV[4], 'ts_ms', now)
return 1
