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
-- A history page ends before the first entry that was already delivered twice or more (a
-- previous owner probably died while handling it: it may kill this one too), and such an entry
-- is read alone: so the acks of everything before it ride on the read that hands it out, and a
-- crash on it does not add a delivery to the entries behind it (max_deliveries counts them).
--! include lib/fence.lua
--! include lib/chunks.lua
for i = 6, #ARGV, 1000 do
  redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local count = tonumber(ARGV[4])
if ARGV[5] ~= '>' then
  local start = '-'
  if ARGV[5] ~= '0' and ARGV[5] ~= '0-0' then start = '(' .. ARGV[5] end
  local ahead = redis.call('XPENDING', KEYS[1], ARGV[2], start, '+', count, ARGV[3])
  for i, p in ipairs(ahead) do
    if p[4] >= 2 then
      count = math.max(i - 1, 1)
      break
    end
  end
end
local res = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', count,
  'STREAMS', KEYS[1], ARGV[5])
local rows = {}
if res then rows = res[1][2] end
if ARGV[5] == '>' then
  if #rows == 0 then
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    local tail = '0-0'
    if #last > 0 then tail = last[1][1] end
    return {rows, {}, {}, tail}
  end
  return {rows, {}, {}, ''}
end
local kept, trimmed = {}, {}
for _, row in ipairs(rows) do
  if row[2] then kept[#kept + 1] = row else trimmed[#trimmed + 1] = row[1] end
end
if #trimmed > 0 then
  chunked({'XACK', KEYS[1], ARGV[2]}, trimmed)
end
local counts = {}
if #kept > 0 then
  local pel = redis.call('XPENDING', KEYS[1], ARGV[2], kept[1][1], kept[#kept][1], #kept, ARGV[3])
  local by_id = {}
  for _, p in ipairs(pel) do by_id[p[1]] = p[4] end
  for i, row in ipairs(kept) do counts[i] = by_id[row[1]] or 1 end
end
return {kept, counts, trimmed, ''}
