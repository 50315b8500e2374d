-- lib/ids.lua: stream-id comparison, included by the scripts that need it.
-- before(a, b): true when stream id a ('ms-seq') sorts before stream id b.
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end
