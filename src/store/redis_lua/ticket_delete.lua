-- An operator drops an app's ticket. KEYS: the ticket. ARGV: channel, notice.
-- Returns the record deleted (and publishes the notice), or nil when none was stored (nothing
-- announced): read and delete in one step, so the answer names exactly what was dropped.
local stored = redis.call('GET', KEYS[1])
if not stored then return false end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return stored
