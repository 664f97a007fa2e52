-- One consumer's newest dead letters in this app. ARGV: consumer, limit. Returns 6 fields per
-- letter: event_id, event_type, attempts, last_error, received_ms, dead_at_ms.
local c, limit = ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZREVRANGEBYSCORE', dead_key(c), '+inf', '-inf', 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  local row = redis.call('HMGET', delivery_key(c, id), 'attempts', 'err', 'received', 'finished')
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', event_key(id), 'type') or ''
  out[#out + 1] = row[1] or '0'
  out[#out + 1] = row[2] or ''
  out[#out + 1] = row[3] or '0'
  out[#out + 1] = row[4] or '0'
end
return out
