-- Compare-and-delete of a token. KEYS: the token hash, the app's expiry index.
-- ARGV: broker key, token, channel, notice. The notice goes out either way, as the local backends
-- announce every invalidation: a replica holding that token drops it.
-- Returns 1 deleted, 0 the stored token is another (or none).
local deleted = 0
if redis.call('HGET', KEYS[1], 't') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  deleted = 1
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return deleted
