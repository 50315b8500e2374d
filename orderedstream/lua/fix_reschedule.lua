-- fix_reschedule: a repair failed: store the updated record and make the entry due again
-- after its backoff (server clock).  Skipped where the claim is not ours (see fix_restream).
-- KEYS[1] delay  KEYS[2] parked
-- ARGV[1] our claim's until_ms   ARGV[2..] per entry: id, backoff ms, record (JSON)
-- Reply: number of entries rescheduled
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local mine = tonumber(ARGV[1])
local done = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if tonumber(redis.call('ZSCORE', KEYS[1], id)) == mine then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[i + 1]), id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 2])
    done = done + 1
  end
end
return done
