-- lib/history.lua: read the caller's own pending entries (XREADGROUP with an id), the way
-- every history read does it.  Needs lib/chunks.lua.
-- read_history(stream, group, consumer, count, start) -> rows, counts, trimmed
--   start    '0' (from the first) or the id to read after
--   rows     {{id, {field, value, ...}}, ...} in ascending id order
--   counts   the delivery count of each row (after this read)
--   trimmed  ids whose stream entry is gone (trimmed/deleted); acked here
-- A page ends before the first entry that was already delivered twice or more (a previous
-- owner probably died while handling it: it may kill this one too), and such an entry is read
-- alone: so the acks of everything before it ride on the read that hands it out, and a crash on
-- it does not add a delivery to the entries behind it (max_deliveries counts them).
local function read_history(stream, group, consumer, count, start)
  count = tonumber(count)
  local from = '-'
  if start ~= '0' and start ~= '0-0' then from = '(' .. start end
  local ahead = redis.call('XPENDING', stream, group, from, '+', count, consumer)
  for i, p in ipairs(ahead) do
    if p[4] >= 2 then
      count = math.max(i - 1, 1)
      break
    end
  end
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
    'STREAMS', stream, start)
  local rows = {}
  if res then rows = res[1][2] end
  local kept, trimmed = {}, {}
  for _, row in ipairs(rows) do
    if row[2] then kept[#kept + 1] = row else trimmed[#trimmed + 1] = row[1] end
  end
  if #trimmed > 0 then
    chunked({'XACK', stream, group}, trimmed)
  end
  local counts = {}
  if #kept > 0 then
    local pel = redis.call('XPENDING', stream, group, kept[1][1], kept[#kept][1], #kept, consumer)
    local by_id = {}
    for _, p in ipairs(pel) do by_id[p[1]] = p[4] end
    for i, row in ipairs(kept) do counts[i] = by_id[row[1]] or 1 end
  end
  return kept, counts, trimmed
end

-- the stream's last id ('0-0' if none)
local function last_id(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 then return last[1][1] end
  return '0-0'
end
