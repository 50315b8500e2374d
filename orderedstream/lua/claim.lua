-- claim: move one page of a dead consumer's pending entries to the caller, and delete the dead
-- consumer once (and only in the same script that proves) its pending list is empty.
-- XGROUP DELCONSUMER drops a consumer's pending entries for good, hence the proof.
-- (take_over.lua does a first page of every consumer in the same script as the new owner's
-- first read; this script goes on where one page was not enough.)
-- KEYS[1] stream   KEYS[2] lease
-- ARGV[1] token    ARGV[2] group   ARGV[3] caller (new owner)   ARGV[4] dead consumer
-- ARGV[5] page size
-- Reply: {claimed, trimmed, deleted}
--   claimed  number of entries now pending to the caller (delivery count unchanged: JUSTID)
--   trimmed  ids whose stream entry was gone; the server dropped them from the PEL
--   deleted  1 when the dead consumer was deleted (its pending list was empty), else 0
-- Error: NOTOWNER
--! include lib/fence.lua
--! include lib/chunks.lua
--! include lib/claim.lua
local claimed, trimmed, deleted = claim_page(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return {claimed, trimmed, deleted}
