-- lib/claim.lua: move one page of a dead consumer's pending entries to the caller, and delete
-- the dead consumer once (and only in the same script that proves) its pending list is empty.
-- XGROUP DELCONSUMER drops a consumer's pending entries for good, hence the proof.
-- Needs lib/chunks.lua.  claim_page(stream, group, caller, dead, page size) returns
--   claimed  number of entries now pending to the caller (delivery count unchanged: JUSTID)
--   trimmed  ids whose stream entry was gone; the server dropped them from the PEL
--   deleted  1 when the dead consumer was deleted (its pending list was empty), else 0
local function claim_page(stream, group, caller, dead, size)
  local pend = redis.call('XPENDING', stream, group, '-', '+', size, dead)
  local trimmed = {}
  local claimed = 0
  if #pend > 0 then
    -- XCLAIM in chunks of 1000 ids (the page size is the caller's); JUSTID goes after the ids
    local got = {}
    for c = 1, #pend, 1000 do
      local args = {'XCLAIM', stream, group, caller, '0'}
      for k = c, math.min(c + 999, #pend) do args[#args + 1] = pend[k][1] end
      args[#args + 1] = 'JUSTID'
      for _, id in ipairs(redis.call(unpack(args))) do got[#got + 1] = id end
    end
    claimed = #got
    if claimed < #pend then
      local seen = {}
      for _, id in ipairs(got) do seen[id] = true end
      for _, p in ipairs(pend) do
        if not seen[p[1]] then trimmed[#trimmed + 1] = p[1] end
      end
      -- A server that keeps missing ids in the PEL through XCLAIM (6.2) would leave them with
      -- the dead consumer forever; ack them so the consumer can be deleted safely.
      chunked({'XACK', stream, group}, trimmed)
    end
  end
  local deleted = 0
  if #redis.call('XPENDING', stream, group, '-', '+', 1, dead) == 0 then
    local dropped = redis.call('XGROUP', 'DELCONSUMER', stream, group, dead)
    if dropped ~= 0 then
      error(redis.error_reply('CLAIMBUG deleted consumer still had ' .. dropped .. ' pending'))
    end
    deleted = 1
  end
  return claimed, trimmed, deleted
end
