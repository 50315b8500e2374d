-- fix_reschedule: a repair failed: store the updated record and make the entry due again
-- after its backoff (server clock), releasing our claim.  Skipped where the claim is not ours.
-- KEYS[1] delay  KEYS[2] parked  KEYS[3] claims
-- ARGV[1] claim token   ARGV[2..] per entry: id, backoff ms, record (JSON)
-- Reply: number of entries rescheduled
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local done = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[i + 1]), id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 2])
    redis.call('HDEL', KEYS[3], id)
    done = done + 1
  end
end
return done
