-- read: fenced "ack the previous batch, then read the next one" (one round trip per batch).
-- KEYS[1] stream   KEYS[2] lease
-- ARGV[1] token    ARGV[2] group   ARGV[3] consumer   ARGV[4] count
-- ARGV[5] '>' for new entries, or an id: read the caller's own pending entries after it
-- ARGV[6..] ids to XACK before reading
-- Reply: {rows, counts, trimmed, tail}
--   rows    {{id, {field, value, ...}}, ...} in ascending id order
--   counts  history reads: the delivery count of each row (after this read); '>' reads: {}
--   trimmed history reads: ids whose stream entry is gone (trimmed/deleted); acked here
--   tail    '>' reads that found nothing: id of the stream's last entry ('0-0' if none), to
--           wait with XREAD BLOCK from without missing an entry added in between; else ''
-- Error:  NOTOWNER when the lease does not hold ARGV[1]
-- A history page ends before the first entry that was already delivered twice or more, which
-- is read alone (see lib/history.lua).
--! include lib/fence.lua
--! include lib/chunks.lua
--! include lib/history.lua
for i = 6, #ARGV, 1000 do
  redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if ARGV[5] == '>' then
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
    'STREAMS', KEYS[1], '>')
  if res and #res[1][2] > 0 then return {res[1][2], {}, {}, ''} end
  return {{}, {}, {}, last_id(KEYS[1])}
end
local rows, counts, trimmed = read_history(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return {rows, counts, trimmed, ''}
