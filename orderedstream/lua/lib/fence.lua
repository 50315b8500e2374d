-- lib/fence.lua: the first step of every fenced script.  KEYS[2] is the group's lease, ARGV[1]
-- the caller's token; anyone else (a former owner woken up) gets NOTOWNER and changes nothing.
local cur = redis.call('GET', KEYS[2])
if cur ~= ARGV[1] then
  return redis.error_reply('NOTOWNER lease is held by ' .. (cur or 'nobody'))
end
