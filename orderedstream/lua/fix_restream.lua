-- fix_restream: put repaired entries back on the stream, all or nothing per entry: XADD with
-- the headers that route it to the deferring group and link it to its origin, then drop it
-- from the delay set and the parked records.  An entry whose claim is no longer ours (its
-- score is not our `until`: our visibility lease ran out and another fixer took it, or an
-- operator acted on it) is left alone.
-- KEYS[1] stream  KEYS[2] delay  KEYS[3] parked
-- ARGV[1] our claim's until_ms  ARGV[2] group
-- ARGV[3..] per entry: id, origin id, times parked, n (field/value count), then n values
-- Reply: {new id or '' (claim lost), ...} in the order given
local mine = tonumber(ARGV[1])
local out = {}
local i = 3
while i <= #ARGV do
  local id, origin, parked, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local first, last = i + 4, i + 3 + n
  if tonumber(redis.call('ZSCORE', KEYS[2], id)) == mine then
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', origin,
      'os-parked', parked, 'os-repaired', '1', unpack(ARGV, first, last))
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  else
    out[#out + 1] = ''
  end
  i = last + 1
end
return out
