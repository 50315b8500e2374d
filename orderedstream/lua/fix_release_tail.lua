-- fix_release_tail: the last step of a hold-key release done outside a script (a holder or
-- follower too big for fix_release.lua, see _fixer.py): queued last in the release's
-- MULTI/EXEC, right behind the XADDs of the copies, so the stream's last entry is the last copy.
-- Sets the key's state as fix_release.lua does: 'tail:<holder id>:<last copy id>:<holder
-- origin>' until the owner has passed the copies, or frees the key when nothing was appended.
-- KEYS[1] held (hash)  KEYS[2] stream
-- ARGV[1] ordering key  ARGV[2] holder id  ARGV[3] holder origin id  ARGV[4] copies appended
-- Reply: the last copy's id, or ''
if tonumber(ARGV[4]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return ''
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1][1]
redis.call('HSET', KEYS[1], ARGV[1], 'tail:' .. ARGV[2] .. ':' .. last .. ':' .. ARGV[3])
return last
