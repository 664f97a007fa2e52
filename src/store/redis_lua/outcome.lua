-- An attempt's outcome, fenced by its lease: applied only while the delivery is pending and its
-- due time is still the claim's lease end. ARGV: consumer, event_id, lease_until_ms, kind
-- ("delivered" | "retry" | "dead"), time_ms (now, or the next attempt for a retry), error.
-- Returns 1 applied, 0 fenced out.
local c, id, lease, kind, t, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local dl = delivery_key(c, id)
local row = redis.call('HMGET', dl, 'state', 'due')
if row[1] ~= '0' or row[2] ~= lease then return 0 end
local counters = counters_key(c)
if kind == 'retry' then
  redis.call('HSET', dl, 'due', t, 'err', err)
  redis.call('ZADD', due_key(c), t, id)
  redis.call('HSET', counters, 'last_error', err, 'last_error_at', now_us())
  return 1
end
redis.call('ZREM', due_key(c), id)
redis.call('ZREM', pending_key(c), id)
redis.call('ZADD', finished_key, t, c .. ':' .. id)
count(c, '0', -1)
if kind == 'delivered' then
  redis.call('HSET', dl, 'state', '1', 'finished', t)
  count(c, '1', 1)
  local last = redis.call('HGET', counters, 'last_delivery')
  if not last or tonumber(last) < tonumber(t) then
    redis.call('HSET', counters, 'last_delivery', t)
  end
else
  redis.call('HSET', dl, 'state', '2', 'finished', t, 'err', err)
  redis.call('ZADD', dead_key(c), t, id)
  count(c, '2', 1)
  redis.call('HSET', counters, 'last_error', err, 'last_error_at', now_us())
end
return 1
