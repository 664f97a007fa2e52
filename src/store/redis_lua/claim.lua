-- Claim due deliveries of one consumer and lease them: the lease end becomes the due time.
-- ARGV: consumer, now_ms, lease_until_ms, limit, then optionally the event ids to claim (picked
-- by the caller across apps; each is claimed only if still due). Returns, per claimed delivery,
-- 7 fields: event_id, attempt, received_ms, event_type, has_tenant, tenant_key, body.
local c, now, lease_until, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local due = due_key(c)
local ids
if #ARGV > 4 then
  ids = { unpack(ARGV, 5) }
else
  ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
end
local out = {}
for _, id in ipairs(ids) do
  local score = redis.call('ZSCORE', due, id)
  if score and tonumber(score) <= tonumber(now) then
    local e = redis.call('HMGET', event_key(id), 'type', 'tenant', 'body')
    if e[1] then
      local dl = delivery_key(c, id)
      local attempts = redis.call('HINCRBY', dl, 'attempts', 1)
      redis.call('HSET', dl, 'due', lease_until)
      redis.call('ZADD', due, lease_until, id)
      local received = redis.call('HGET', dl, 'received') or '0'
      local has_tenant = '0'
      if e[2] then has_tenant = '1' end
      out[#out + 1] = id
      out[#out + 1] = tostring(attempts)
      out[#out + 1] = received
      out[#out + 1] = e[1]
      out[#out + 1] = has_tenant
      out[#out + 1] = e[2] or ''
      out[#out + 1] = e[3] or ''
    end
  end
end
return out
