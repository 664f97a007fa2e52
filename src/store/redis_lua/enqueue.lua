-- Dedupe and enqueue in one step. ARGV: event_id, received_ms, dedupe_until_ms, event_type,
-- has_tenant ("1"/"0"), tenant_key, body, consumer... (deduplicated by the caller).
-- Returns 1 queued, 0 duplicate (nothing written).
local id, received, dedupe_until = ARGV[1], ARGV[2], ARGV[3]
local seen = redis.call('ZSCORE', dedupe_key, id)
if seen and tonumber(seen) > tonumber(received) then return 0 end
redis.call('ZADD', dedupe_key, dedupe_until, id)
local ev = event_key(id)
local refs = tonumber(redis.call('HGET', ev, 'refs') or '0')
for i = 8, #ARGV do
  local c = ARGV[i]
  local old = redis.call('HGET', delivery_key(c, id), 'state')
  if old then count(c, old, -1) else refs = refs + 1 end
  count(c, '0', 1)
  set_pending(c, id, received, received)
end
redis.call('HSET', ev, 'received', received, 'refs', tostring(refs), 'type', ARGV[4], 'body', ARGV[7])
if ARGV[5] == '1' then
  redis.call('HSET', ev, 'tenant', ARGV[6])
else
  redis.call('HDEL', ev, 'tenant')
end
return 1
