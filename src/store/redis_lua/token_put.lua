-- A fenced token write: stored only if it expires later than the stored token, so a slow
-- replica's older token never replaces a newer one. KEYS: the token hash, the app's expiry index.
-- ARGV: broker key, token, expires_at_ms, fetched_at_ms, channel, notice.
-- Returns 1 stored (and announced), 0 kept the newer one.
local stored = redis.call('HGET', KEYS[1], 'e')
if stored and tonumber(stored) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'e', ARGV[3], 'f', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
