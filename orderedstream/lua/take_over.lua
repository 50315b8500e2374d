-- take_over: a new owner's takeover and first read, in one script (DESIGN.md §5): claim a page
-- of every other consumer's pending entries (deleting each consumer whose pending list is then
-- empty, see lib/claim.lua), and when nothing is left to claim, add the takeover to the
-- timeline and read the first page: the caller's own pending entries from the start (the
-- replay: every claimed entry comes before anything new), or, when it has none, new entries.
-- It is fenced by the term's nonce, not its token, so that it can be pipelined right behind
-- acquire.lua (the epoch in the token is the server's choice): the lease must hold
-- "<caller>:<epoch>:<nonce>"; the nonce is random per acquisition, so no other term has it.
-- KEYS[1] stream   KEYS[2] lease   KEYS[3] events (stream)
-- ARGV[1] caller (new owner)   ARGV[2] the term's nonce   ARGV[3] group
-- ARGV[4] claim page size per consumer   ARGV[5] read count   ARGV[6] events MAXLEN (approx.)
-- Reply: {epoch, claimed, trimmed, deleted, left, kind, rows, counts, read_trimmed, tail}
--   epoch         the term's epoch (from the lease)
--   claimed       entries moved to the caller;  trimmed: ids found gone while claiming (acked)
--   deleted       {consumer, ...} deleted (their pending lists were empty)
--   left          {consumer, ...} with entries still pending after one page: claim.lua goes
--                 on, and nothing was read (kind 'none') nor added to the timeline
--   kind          'replay': rows/counts/read_trimmed as read.lua's history read from '0';
--                 'new': the caller had nothing pending, rows are new entries now delivered to
--                 it (read.lua's '>' read); 'none': nothing read
--   tail          the stream's last id before the read ('0-0' if none)
-- Error: NOTOWNER; NOGROUP (the stream or the group is gone)
--! include lib/chunks.lua
--! include lib/claim.lua
--! include lib/history.lua
local cur = redis.call('GET', KEYS[2])
local head, tail_ = ARGV[1] .. ':', ':' .. ARGV[2]
local epoch = cur and string.sub(cur, 1, #head) == head and string.sub(cur, -#tail_) == tail_
  and string.match(string.sub(cur, #head + 1, -#tail_ - 1), '^%d+$')
if not epoch then
  return redis.error_reply('NOTOWNER lease is held by ' .. (cur or 'nobody'))
end
local infos = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[3])
if infos.err then
  local text = string.lower(infos.err)
  if string.find(text, 'nogroup', 1, true) or string.find(text, 'no such key', 1, true) then
    return redis.error_reply('NOGROUP ' .. infos.err .. ' (the stream or group is gone)')
  end
  return infos
end
local claimed, trimmed, deleted, left = 0, {}, {}, {}
for _, info in ipairs(infos) do
  local name
  for i = 1, #info, 2 do
    if info[i] == 'name' then name = info[i + 1] end
  end
  if name ~= ARGV[1] then
    local n, gone, done = claim_page(KEYS[1], ARGV[3], ARGV[1], name, ARGV[4])
    claimed = claimed + n
    for _, id in ipairs(gone) do trimmed[#trimmed + 1] = id end
    if done == 1 then deleted[#deleted + 1] = name else left[#left + 1] = name end
  end
end
local tail = last_id(KEYS[1])
if #left > 0 then
  return {epoch, claimed, trimmed, deleted, left, 'none', {}, {}, {}, tail}
end
local names = table.concat(deleted, ',')
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'type', 'takeover',
  'consumer', ARGV[1], 'epoch', epoch, 'claimed', claimed, 'deleted', names,
  'trimmed', #trimmed, 'duration_ms', '0')
if #redis.call('XPENDING', KEYS[1], ARGV[3], '-', '+', 1, ARGV[1]) > 0 then
  local rows, counts, gone = read_history(KEYS[1], ARGV[3], ARGV[1], ARGV[5], '0')
  return {epoch, claimed, trimmed, deleted, left, 'replay', rows, counts, gone, tail}
end
local res = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[5],
  'STREAMS', KEYS[1], '>')
local rows = {}
if res then rows = res[1][2] end
return {epoch, claimed, trimmed, deleted, left, 'new', rows, {}, {}, tail}
