-- defer: park a stream entry in the delay set and ack it, all or nothing (fenced).
-- The member is the entry's own id, so two identical payloads stay two parked entries; the
-- payload lives beside it in a hash.
-- KEYS[1] stream   KEYS[2] lease   KEYS[3] delay (zset)   KEYS[4] parked (hash)
-- ARGV[1] token    ARGV[2] group   ARGV[3] entry id   ARGV[4] payload (JSON)   ARGV[5] delay_ms
-- Reply: due time in ms on the server clock.   Error: NOTOWNER
local cur = redis.call('GET', KEYS[2])
if cur ~= ARGV[1] then
  return redis.error_reply('NOTOWNER lease is held by ' .. (cur or 'nobody'))
end
local t = redis.call('TIME')
local due = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[5])
-- A retried call (reply lost) finds the entry parked already: keep the first record.
if redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[3], due, ARGV[3])
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
return due
