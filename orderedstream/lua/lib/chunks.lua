-- lib/chunks.lua: commands over lists whose length the caller or the data decides.  A script
-- passes a command's arguments on Lua's C stack, which holds ~8000 values (`unpack` of more
-- fails with "too many results to unpack"), so such lists go out in chunks of 1000.  One XADD
-- cannot be split: a script re-streams an entry of at most MAX_VALUES field/value values (the
-- fixer re-streams bigger ones outside a script) and checks that before its first write.
local MAX_VALUES = 7800
-- redis.call(head..., list[first..last]) per chunk of 1000; returns the replies joined (array
-- replies) and their sum (integer replies)
local function chunked(head, list, first, last)
  first, last = first or 1, last or #list
  local joined, sum = {}, 0
  for c = first, last, 1000 do
    local args = {}
    for k = 1, #head do args[k] = head[k] end
    for k = c, math.min(c + 999, last) do args[#args + 1] = list[k] end
    local reply = redis.call(unpack(args))
    if type(reply) == 'table' then
      for k = 1, #reply do joined[#joined + 1] = reply[k] end
    else
      sum = sum + reply
    end
  end
  return joined, sum
end
