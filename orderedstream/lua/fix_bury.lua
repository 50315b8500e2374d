-- fix_bury: move entries the fixer gave up on to the graveyard stream (record with its whole
-- history), for a person; drop them from the delay set, the parked records and the claims.
-- Skipped where the claim is not ours.  ARGV[1] '' skips the claim check (an operator's
-- command acting on an entry no fixer holds).
-- KEYS[1] delay  KEYS[2] parked  KEYS[3] claims  KEYS[4] graveyard (stream)
-- ARGV[1] claim token or ''   ARGV[2..] per entry: id, record (JSON), reason
-- Reply: {graveyard id or '', ...}
local out = {}
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local claim = redis.call('HGET', KEYS[3], id)
  if (ARGV[1] == '' and redis.call('HEXISTS', KEYS[2], id) == 1) or
     (ARGV[1] ~= '' and claim == ARGV[1]) then
    out[#out + 1] = redis.call('XADD', KEYS[4], '*', 'id', id, 'reason', ARGV[i + 2],
      'record', ARGV[i + 1])
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  else
    out[#out + 1] = ''
  end
end
return out
