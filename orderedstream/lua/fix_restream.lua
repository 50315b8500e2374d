-- fix_restream: put repaired entries back on the stream, all or nothing per entry: XADD with
-- the headers that route it to the deferring group and link it to its origin, then drop it
-- from the delay set and the parked records.  An entry whose claim is no longer ours (its
-- score is not our `until`: our visibility lease ran out and another fixer took it, or an
-- operator acted on it) is left alone.  The claim check and the removals are one command per
-- 1000 entries (ZMSCORE, ZREM, HDEL), so the per-entry work is the XADD.
-- Every entry is checked before the first write, so the script never fails half-way (a failed
-- script keeps what it wrote: entries re-streamed but still claimed would come back again):
-- an entry of more than MAX_VALUES field/value values (lib/chunks.lua) is refused, with
-- nothing written; the fixer re-streams such an entry outside a script.
-- KEYS[1] stream  KEYS[2] delay  KEYS[3] parked
-- ARGV[1] our claim's until_ms  ARGV[2] group
-- ARGV[3..] per entry: id, origin id, times parked, n (field/value count), then n values
-- Reply: {new id or '' (claim lost), ...} in the order given
-- Error: TOOLARGE (an entry has too many values), BADARGS (malformed ARGV); nothing written
--! include lib/chunks.lua
local mine = tonumber(ARGV[1])
local starts, ids = {}, {}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i + 3])
  if not n or n < 2 or n % 2 ~= 0 or i + 3 + n > #ARGV then
    return redis.error_reply('BADARGS fix_restream: entry at ARGV[' .. i .. '] is malformed')
  end
  if n > MAX_VALUES then
    return redis.error_reply('TOOLARGE entry ' .. ARGV[i] .. ' has ' .. n / 2 ..
      ' fields; a script can re-stream at most ' .. MAX_VALUES / 2)
  end
  starts[#starts + 1] = i
  ids[#ids + 1] = ARGV[i]
  i = i + 4 + n
end
local scores = chunked({'ZMSCORE', KEYS[2]}, ids)
local out, done = {}, {}
for k = 1, #ids do
  local s = starts[k]
  if tonumber(scores[k]) == mine then
    local n = tonumber(ARGV[s + 3])
    out[k] = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', ARGV[s + 1],
      'os-parked', ARGV[s + 2], 'os-repaired', '1', unpack(ARGV, s + 4, s + 3 + n))
    done[#done + 1] = ids[k]
  else
    out[k] = ''
  end
end
chunked({'ZREM', KEYS[2]}, done)
chunked({'HDEL', KEYS[3]}, done)
return out
