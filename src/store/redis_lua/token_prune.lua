-- One chunk of the token prune in one app. KEYS: the app's expiry index.
-- ARGV: the app's token key base ("<prefix>:{<app>}:token:"), now_ms, chunk.
-- Deletes tokens that expired at or before now. Returns how many.
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, k in ipairs(keys) do redis.call('DEL', ARGV[1] .. k) end
if #keys > 0 then redis.call('ZREM', KEYS[1], unpack(keys)) end
return #keys
