-- target_set: store the next target assignment of a topic's group, if the stored one is still
-- the one it was derived from (compare-and-set on its version).  Every member derives the next
-- target the same way (_assign.rebalance of the stored one and the live members), so with no
-- leader there is still one line of targets, and each step moves only what must move.
-- KEYS[1] assignment (hash: version, members (JSON list), target (JSON member -> partitions))
-- KEYS[2] events (stream: the rebalance timeline)
-- ARGV[1] the version the new target was derived from ('0': none stored)
-- ARGV[2] members (JSON)   ARGV[3] target (JSON)   ARGV[4] who   ARGV[5] partitions moved
-- ARGV[6] events MAXLEN (approximate)
-- Reply: {1, version} stored; {0, version, members, target} another member stored one first
local have = redis.call('HMGET', KEYS[1], 'version', 'members', 'target')
local version = have[1] or '0'
if version ~= ARGV[1] then
  return {0, version, have[2] or '[]', have[3] or '{}'}
end
local next_version = tostring(tonumber(version) + 1)
redis.call('HSET', KEYS[1], 'version', next_version, 'members', ARGV[2], 'target', ARGV[3])
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', 'assigned', 'member', ARGV[4],
  'partitions', ARGV[5], 'ts_ms', now)
return {1, next_version}
