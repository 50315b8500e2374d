-- fix_release: settle the holder of an ordering key (hold-key mode) and release its followers,
-- all or nothing: the holder is re-streamed (repaired), buried (graveyard) or purged, then every
-- follower is appended behind it in its original order, each copy marked os-hold-gen = the
-- holder's id; the key stays held as 'tail:<holder id>:<last id>:<holder origin>' until the
-- owner has passed that id (hold.lua), so older entries of the key still ahead of the owner go
-- behind it too.
-- KEYS[1] stream  KEYS[2] delay  KEYS[3] parked  KEYS[4] held
-- KEYS[5] followers (zset, see lib/held.lua)  KEYS[6] graveyard
-- ARGV[1] our claim's until_ms (see fix_restream), or '' (an operator's command: the entry
--         must merely be parked)
-- ARGV[2] group  ARGV[3] ordering key  ARGV[4] holder id
-- ARGV[5] 'restream' | 'bury' | 'purge'   ARGV[6] origin id  ARGV[7] times parked
-- ARGV[8] graveyard record (JSON)  ARGV[9] reason   ARGV[10] n: holder field/value count
-- ARGV[11 .. 10+n] holder fields   then f: follower count, then per follower, in the zset's
-- order: its zset member, id, origin id, m, m values
-- The holder is released only once the group has passed the end of the key's previous
-- release (see lib/held.lua), else {'notyet'}.
-- Reply: {'ok', holder's new id or '', last id appended or ''} | {'stale'} (the followers
--        changed since they were read: read them again) | {'lost'} (not our claim / not
--        parked) | {'notyet'} (try again shortly)
-- Error: TOOLARGE when the holder or a follower has more than MAX_VALUES field/value values
--        (lib/chunks.lua; checked before the first write, nothing written): the fixer
--        releases such a key outside a script (WATCH/MULTI/EXEC, see _fixer.py)
--! include lib/chunks.lua
--! include lib/ids.lua
--! include lib/held.lua
local id = ARGV[4]
if ARGV[1] == '' then
  if redis.call('HEXISTS', KEYS[3], id) == 0 then return {'lost'} end
elseif tonumber(redis.call('ZSCORE', KEYS[2], id)) ~= tonumber(ARGV[1]) then
  return {'lost'}
end
local state = redis.call('HGET', KEYS[4], ARGV[3])
local holding = false
if state and string.sub(state, 1, 5) ~= 'tail:' then
  local hid, _, chain = holder_state(state)
  holding = hid == id
  if holding and chain ~= '-' then
    -- copies of the key's previous release may still be ahead of the owner; releasing now
    -- could put followers before them.  Wait until the group has handled past `chain`.
    if #redis.call('XPENDING', KEYS[1], ARGV[2], '-', chain, 1) > 0 then return {'notyet'} end
    local passed = false
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
      local name, last_delivered
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] end
        if g[i] == 'last-delivered-id' then last_delivered = g[i + 1] end
      end
      if name == ARGV[2] then
        passed = last_delivered == chain or before(chain, last_delivered)
      end
    end
    if not passed then return {'notyet'} end
  end
end
local n = tonumber(ARGV[10])
if n > MAX_VALUES then
  return redis.error_reply('TOOLARGE entry ' .. id .. ' has ' .. n / 2 ..
    ' fields; a script can re-stream at most ' .. MAX_VALUES / 2)
end
local i = 11 + n
local f = tonumber(ARGV[i])
i = i + 1
if redis.call('ZCARD', KEYS[5]) ~= f then return {'stale'} end
local listed = redis.call('ZRANGE', KEYS[5], 0, -1)
local followers = {}
for k = 1, f do
  local member, fid, origin, m = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if listed[k] ~= member then return {'stale'} end
  if m > MAX_VALUES then
    return redis.error_reply('TOOLARGE entry ' .. fid .. ' has ' .. m / 2 ..
      ' fields; a script can re-stream at most ' .. MAX_VALUES / 2)
  end
  followers[k] = {fid, i + 4, i + 3 + m, origin}
  i = i + 4 + m
end
local holder_new, last = '', ''
if ARGV[5] == 'restream' then
  holder_new = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', ARGV[6],
    'os-parked', ARGV[7], 'os-repaired', '1', 'os-hold-gen', id, unpack(ARGV, 11, 10 + n))
  last = holder_new
elseif ARGV[5] == 'bury' then
  redis.call('XADD', KEYS[6], '*', 'id', id, 'reason', ARGV[9], 'record', ARGV[8])
end
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
for _, fol in ipairs(followers) do
  last = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', fol[4],
    'os-hold-gen', id, unpack(ARGV, fol[2], fol[3]))
  redis.call('HDEL', KEYS[3], fol[1])
end
redis.call('DEL', KEYS[5])
if holding then
  if last ~= '' then
    redis.call('HSET', KEYS[4], ARGV[3], 'tail:' .. id .. ':' .. last .. ':' .. ARGV[6])
  else
    redis.call('HDEL', KEYS[4], ARGV[3])
  end
end
return {'ok', holder_new, last}
