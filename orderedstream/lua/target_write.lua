-- target_write: store the next target if nobody stored another since it was derived, and the
-- live members are still those it was derived for (compare-and-set).
-- KEYS[1] members (sorted set: member -> expiry ms, server clock)   KEYS[2] assignment (hash)
-- KEYS[3] events (stream: the group's rebalance timeline)
-- ARGV[1] the version it was derived from ('0': none)   ARGV[2] members JSON   ARGV[3] target JSON
-- ARGV[4] who derived it   ARGV[5] the partitions it moves (comma-separated)
-- ARGV[6] events MAXLEN (approximate)
-- ARGV[7..] the live members it was derived for, sorted by bytes
-- Reply: {1, new version} stored; {0, stored version} not stored (read again)
local stored = redis.call('HGET', KEYS[2], 'version') or '0'
if stored ~= ARGV[1] then
  return {0, stored}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), '+inf')
table.sort(live)
if #live ~= #ARGV - 6 then
  return {0, stored}
end
for i, member in ipairs(live) do
  if member ~= ARGV[i + 6] then
    return {0, stored}
  end
end
local version = string.format('%d', tonumber(stored) + 1)
local now_ms = string.format('%d', now)
redis.call('HSET', KEYS[2], 'version', version, 'members', ARGV[2], 'target', ARGV[3],
           'updated_ms', now_ms)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'type', 'assigned', 'member', ARGV[4],
  'partitions', ARGV[5], 'ts_ms', now_ms, 'version', version)
return {1, version}
