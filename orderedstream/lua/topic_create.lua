-- topic_create: write a topic's metadata once; if it is there already, return what it says.
-- KEYS[1] the topic's metadata hash (TopicKeys.meta)
-- ARGV[1] partitions   ARGV[2] routing hash name   ARGV[3] partition streams (JSON list)
-- ARGV[4] metadata format version
-- Reply: {created (1 or 0), partitions, hash, streams, created_ms} (the stored values when 0)
local have = redis.call('HMGET', KEYS[1], 'partitions', 'hash', 'streams', 'created_ms')
if have[1] then
  return {0, have[1], have[2] or '', have[3] or '[]', have[4] or '0'}
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'hash', ARGV[2], 'streams', ARGV[3],
           'created_ms', now, 'version', ARGV[4])
return {1, ARGV[1], ARGV[2], ARGV[3], now}
