-- fix_claim: take up to ARGV[2] due parked entries under a visibility lease.  Each taken entry
-- is re-scored to `until` = now + ARGV[3] ms, so if this fixer dies it is offered again then.
-- `until` is also the claim's token: a later claim of the same entry (only possible once
-- `until` has passed) gives it a higher score, so the scripts that finish an entry check that
-- its score still equals the caller's `until`.  One claims-hash field per fixer says what it
-- holds, for operators.
-- KEYS[1] delay (zset)  KEYS[2] parked (hash)  KEYS[3] claims (hash)
-- ARGV[1] fixer name   ARGV[2] max entries   ARGV[3] visibility ms
-- Reply: {now_ms, until_ms, {id, ...}, {record JSON or false, ...}, ms until the next entry is
--         due after this claim (-1: the delay set is empty)}
--! include lib/chunks.lua
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local until_ms = now + tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local records = {}
if #ids > 0 then
  local args = {}
  for _, id in ipairs(ids) do
    args[#args + 1] = until_ms
    args[#args + 1] = id
  end
  chunked({'ZADD', KEYS[1], 'XX'}, args)  -- 500 pairs a command
  redis.call('HSET', KEYS[3], ARGV[1], until_ms .. ' ' .. #ids)
  records = chunked({'HMGET', KEYS[2]}, ids)
end
local next_due = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first > 0 then next_due = math.max(tonumber(first[2]) - now, 0) end
return {now, until_ms, ids, records, next_due}
