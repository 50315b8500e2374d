-- ack: fenced XACK (XACK itself takes no consumer, so an unfenced zombie could ack the new
-- owner's entries).
-- KEYS[1] stream   KEYS[2] lease
-- ARGV[1] token    ARGV[2] group   ARGV[3..] ids
-- Reply: number of entries acknowledged.   Error: NOTOWNER
--! include lib/fence.lua
local n = 0
for i = 3, #ARGV, 1000 do
  n = n + redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return n
