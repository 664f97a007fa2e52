-- Queue selected retained deliveries of one consumer again, due now, attempts reset.
-- ARGV: consumer, now_ms, mode, then per mode:
--   "dead":   chunk                          (dead at or before now; they leave the dead index)
--   "window": since_ms, until_ms, offset, chunk (received in [since, until], whatever the state)
--   "ids":    event_id...
-- Returns { redelivered, scanned } (the caller pages "window" by offset and "dead" until empty).
local c, now, mode = ARGV[1], ARGV[2], ARGV[3]
local ids
if mode == 'dead' then
  ids = redis.call('ZRANGEBYSCORE', dead_key(c), '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
elseif mode == 'window' then
  ids = redis.call('ZRANGEBYSCORE', received_key(c), ARGV[4], ARGV[5], 'LIMIT',
    tonumber(ARGV[6]), tonumber(ARGV[7]))
else
  ids = { unpack(ARGV, 4) }
end
local n, seen = 0, {}
for _, id in ipairs(ids) do
  if not seen[id] then
    seen[id] = true
    local row = redis.call('HMGET', delivery_key(c, id), 'state', 'received')
    if row[1] then
      count(c, row[1], -1)
      count(c, '0', 1)
      set_pending(c, id, row[2], now)
      n = n + 1
    end
  end
end
return { n, #ids }
