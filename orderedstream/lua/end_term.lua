-- end_term: delete the lease if it still holds the given token (compare-and-delete), then
-- append to the events stream, which wakes every standby blocked on it.
-- Used by an owner releasing on clean shutdown, and by a standby ending a term whose owner's
-- heartbeat connection is gone.
-- KEYS[1] lease   KEYS[2] events (stream)
-- ARGV[1] token of the term to end   ARGV[2] event type ('released' | 'ended')
-- ARGV[3] who ends it                 ARGV[4] reason     ARGV[5] events MAXLEN (approximate)
-- Reply: 1 ended, 0 the lease no longer held that token (nothing changed)
-- A token is "consumer:epoch:nonce" (consumer names hold no ':'; a token of an older release has
-- no nonce); a token that is neither is recorded whole as the consumer.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
local consumer, epoch = string.match(ARGV[1], '^([^:]*):(%d+)')
if not consumer then consumer, epoch = ARGV[1], '0' end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[2],
  'consumer', consumer, 'epoch', epoch,
  'by', ARGV[3], 'reason', ARGV[4], 'ts_ms', now)
return 1
