-- fix_restream: put repaired entries back on the stream, all or nothing per entry: XADD with
-- the headers that route it to the deferring group and link it to its origin, then drop it
-- from the delay set and the parked records.  An entry whose claim is no longer ours (its
-- score is not our `until`: our visibility lease ran out and another fixer took it, or an
-- operator acted on it) is left alone.  The claim check and the removals are one command per
-- batch (ZMSCORE, ZREM, HDEL), so the per-entry work is the XADD.
-- KEYS[1] stream  KEYS[2] delay  KEYS[3] parked
-- ARGV[1] our claim's until_ms  ARGV[2] group
-- ARGV[3..] per entry: id, origin id, times parked, n (field/value count), then n values
-- Reply: {new id or '' (claim lost), ...} in the order given
local mine = tonumber(ARGV[1])
local starts, ids = {}, {}
local i = 3
while i <= #ARGV do
  starts[#starts + 1] = i
  ids[#ids + 1] = ARGV[i]
  i = i + 4 + tonumber(ARGV[i + 3])
end
local out, done = {}, {}
for c = 1, #ids, 1000 do
  local last_c = math.min(c + 999, #ids)
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(ids, c, last_c))
  for k = c, last_c do
    local s = starts[k]
    if tonumber(scores[k - c + 1]) == mine then
      local n = tonumber(ARGV[s + 3])
      out[k] = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', ARGV[s + 1],
        'os-parked', ARGV[s + 2], 'os-repaired', '1', unpack(ARGV, s + 4, s + 3 + n))
      done[#done + 1] = ids[k]
    else
      out[k] = ''
    end
  end
end
for c = 1, #done, 1000 do
  local last_c = math.min(c + 999, #done)
  redis.call('ZREM', KEYS[2], unpack(done, c, last_c))
  redis.call('HDEL', KEYS[3], unpack(done, c, last_c))
end
return out
