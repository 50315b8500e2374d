-- fix_bury: move entries the fixer gave up on to the graveyard stream (record with its whole
-- history), for a person; drop them from the delay set and the parked records.  Skipped where
-- the claim is not ours (see fix_restream).
-- KEYS[1] delay  KEYS[2] parked  KEYS[3] graveyard (stream)
-- ARGV[1] our claim's until_ms   ARGV[2..] per entry: id, record (JSON), reason
-- Reply: {graveyard id or '', ...}
local mine = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if tonumber(redis.call('ZSCORE', KEYS[1], id)) == mine then
    out[#out + 1] = redis.call('XADD', KEYS[3], '*', 'id', id, 'reason', ARGV[i + 2],
      'record', ARGV[i + 1])
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    out[#out + 1] = ''
  end
end
return out
