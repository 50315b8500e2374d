-- lib/held.lua: hold-key state helpers (needs lib/ids.lua).  Order within a key is the order
-- of origin ids (an entry's first stream id; a copy orderedstream appended keeps it).
-- held[key]:
--   '<holder id> <holder origin> <chain end or ->'  while the holder is parked; <chain end> is
--       the last copy of an earlier release of the key that the owner may not have passed yet
--   'tail:<gen>:<last>:<holder origin>'  once release <gen> appended the holder's copy and its
--       followers, the last as <last>
-- followers of a key: a zset scored by origin ms, members '<origin seq, 20 digits> <id>', so
-- ZRANGE gives origin order whatever order the entries arrived in.
local function follow(key, origin, id)
  local ms, seq = string.match(origin, '^(%d+)-(%d+)$')
  redis.call('ZADD', key, ms, string.rep('0', 20 - #seq) .. seq .. ' ' .. id)
end
local function holder_state(state)
  return string.match(state, '^(%S+) (%S+) (%S+)$')
end
