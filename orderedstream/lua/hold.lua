-- hold: decide, atomically, what happens to an entry whose ordering key may be held
-- (hold-key mode; fenced).  Called before the handler for entries whose key the owner has
-- seen held.
-- KEYS[1] stream  KEYS[2] lease  KEYS[3] parked (hash)  KEYS[4] held (hash)
-- KEYS[5] followers of ARGV[4] (zset, see lib/held.lua)
-- KEYS[6] delay (zset)  KEYS[7] signal (stream): optional, see 'parked' below
-- ARGV[1] token  ARGV[2] group  ARGV[3] entry id  ARGV[4] ordering key
-- ARGV[5] the entry's os-hold-gen header ('' if none): which release appended it
-- ARGV[6] record (JSON) to park it with   ARGV[7] its origin id (os-origin-id, or its own id)
-- ARGV[8..] its field/value pairs without orderedstream's os-* headers
-- Reply: {'free', released}  hand it to the handler; released = 1 when the key is not held
--                            any more (the caller may stop asking for it)
--        {'follower'}        parked behind the holder, in origin order (acked)
--        {'forwarded', id}   the holder was re-streamed up to a later id: this older entry is
--                            appended behind the copies (acked), so the key keeps its order
--        {'parked'}          as 'forwarded', for an entry of more than MAX_VALUES field/value
--                            values (lib/chunks.lua), which a script cannot XADD: it becomes
--                            the key's holder instead, due now, behind the copies (chain =
--                            their last id); the fixer re-streams it once the group has passed
--                            them.  Needs KEYS[6] and KEYS[7]; a caller that passes only five
--                            keys gets {'free', 0} for such an entry (handled where it is).
-- Error: NOTOWNER
--! include lib/fence.lua
--! include lib/chunks.lua
--! include lib/ids.lua
--! include lib/held.lua
local origin = ARGV[7]
local state = redis.call('HGET', KEYS[4], ARGV[4])
if not state then return {'free', 1} end
if string.sub(state, 1, 5) ~= 'tail:' then
  local hid, horigin = holder_state(state)
  -- the holder itself, or an entry that precedes it (a replay after a crash): let it be
  if hid == ARGV[3] or before(origin, horigin) then return {'free', 0} end
  if redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[6]) == 1 then
    follow(KEYS[5], origin, ARGV[3])
  end
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  return {'follower'}
end
-- copies of this generation pass in order; an entry that precedes the holder passes; anything
-- else of the key still positioned before `last` is moved behind it
local gen, last, horigin = string.match(state, '^tail:([^:]+):([^:]+):(.+)$')
if ARGV[5] == gen then
  if ARGV[3] == last or before(last, ARGV[3]) then
    redis.call('HDEL', KEYS[4], ARGV[4])
    return {'free', 1}
  end
  return {'free', 0}
end
if before(origin, horigin) then return {'free', 0} end
if not before(ARGV[3], last) then
  redis.call('HDEL', KEYS[4], ARGV[4])
  return {'free', 1}
end
if #ARGV - 7 > MAX_VALUES then
  if not KEYS[7] then return {'free', 0} end
  local record = string.gsub(ARGV[6], ',"role":"follower",', ',"role":"holder",', 1)
  if redis.call('HSETNX', KEYS[3], ARGV[3], record) == 1 then
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    redis.call('HSET', KEYS[4], ARGV[4], ARGV[3] .. ' ' .. origin .. ' ' .. last)
    redis.call('ZADD', KEYS[6], now, ARGV[3])
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', 100, '*', 'due', now)
  end
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  return {'parked'}
end
local id = redis.call('XADD', KEYS[1], '*', 'os-for', ARGV[2], 'os-origin-id', origin,
  'os-hold-gen', gen, unpack(ARGV, 8))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[4], 'tail:' .. gen .. ':' .. id .. ':' .. horigin)
return {'forwarded', id}
