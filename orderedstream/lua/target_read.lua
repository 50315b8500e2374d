-- target_read: the live members of a topic's group and the stored target, read together.
-- KEYS[1] members (sorted set: member -> expiry ms, server clock)   KEYS[2] assignment (hash)
-- ARGV: none
-- Reply: {now_ms, {live members, sorted by bytes}, version ('0' if none), members JSON, target JSON}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), '+inf')
table.sort(live)
local have = redis.call('HMGET', KEYS[2], 'version', 'members', 'target')
return {string.format('%d', now), live, have[1] or '0', have[2] or '[]', have[3] or '{}'}
