-- defer: park a stream entry and ack it, all or nothing (fenced).
-- The member is the entry's own id, so two identical payloads stay two parked entries; the
-- record (fields + metadata, JSON) lives beside it in the parked hash.
-- Hold-key mode (ARGV[6] ~= ''): the entry becomes the holder of its ordering key, so later
-- entries with that key are parked behind it (hold.lua) until it is repaired and re-streamed.
-- If another parked entry already holds the key, this one is parked behind it instead (it
-- is then not scheduled: it returns to the stream with its holder) - unless it comes before
-- that holder in the stream (a replay after a crash): then it takes the key over.
-- KEYS[1] stream  KEYS[2] lease  KEYS[3] delay (zset)  KEYS[4] parked (hash)  KEYS[5] signal
-- KEYS[6] held (hash)  KEYS[7] followers of ARGV[6] (zset, see lib/held.lua)
-- ARGV[1] token  ARGV[2] group  ARGV[3] entry id  ARGV[4] record (JSON)  ARGV[5] delay_ms
-- ARGV[6] ordering key, or ''   ARGV[7] the entry's origin id (its first stream id)
-- Reply: {due ms on the server clock (0 for a follower), 'plain' | 'holder' | 'follower'}
-- Error: NOTOWNER
--! include lib/fence.lua
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = now + tonumber(ARGV[5])
--! include lib/ids.lua
--! include lib/held.lua
local id, origin = ARGV[3], ARGV[7]
local role = 'plain'
local demoted, demoted_origin = nil, nil
local chain = '-'
if ARGV[6] ~= '' then
  local state = redis.call('HGET', KEYS[6], ARGV[6])
  if state and string.sub(state, 1, 5) == 'tail:' then
    -- copies of the last release may still be ahead of the owner: remember where they end
    chain = string.match(state, '^tail:[^:]+:([^:]+):')
    role = 'holder'
  elseif state then
    local hid, horigin, hchain = holder_state(state)
    chain = hchain
    if hid == id then
      role = 'holder'
    elseif before(origin, horigin) then
      -- an entry that precedes the current holder (a replay after a crash): it holds the key
      -- now, and the old holder waits behind it as a follower (it comes back after it,
      -- unrepaired, and is parked again if it still fails)
      demoted, demoted_origin = hid, horigin
      role = 'holder'
    else
      role = 'follower'
    end
  else
    role = 'holder'
  end
end
-- A retried call (reply lost) finds the entry parked already: keep the first record.
if redis.call('HSETNX', KEYS[4], id, ARGV[4]) == 1 then
  if role == 'follower' then
    follow(KEYS[7], origin, id)
    due = 0
  else
    if role == 'holder' then
      redis.call('HSET', KEYS[6], ARGV[6], id .. ' ' .. origin .. ' ' .. chain)
    end
    if demoted then
      redis.call('ZREM', KEYS[3], demoted)
      follow(KEYS[7], demoted_origin, demoted)
    end
    redis.call('ZADD', KEYS[3], due, id)
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100, '*', 'due', due)
  end
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
return {due, role}
