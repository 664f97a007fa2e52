-- One consumer's counters in this app. ARGV: consumer. Returns pending, dead, delivered,
-- last_delivery_ms, last_error, last_error_at_us, oldest pending received_ms ("" if none).
local c = ARGV[1]
local k = redis.call('HMGET', counters_key(c), 'pending', 'dead', 'delivered', 'last_delivery',
  'last_error', 'last_error_at')
local oldest = ''
local first = redis.call('ZRANGE', pending_key(c), 0, 0)
if first[1] then
  oldest = redis.call('HGET', delivery_key(c, first[1]), 'received') or ''
end
return { k[1] or '0', k[2] or '0', k[3] or '0', k[4] or '0', k[5] or '', k[6] or '0', oldest }
