-- One chunk of the hand-off purge in this app. ARGV: now_ms, cutoff_ms ("" for none), chunk.
-- Deletes dedupe marks that ended at or before now, and deliveries finished (delivered or dead)
-- at or before the cutoff; an event's body goes with its last delivery.
-- Returns { marks deleted, deliveries deleted }.
local now, cutoff, chunk = ARGV[1], ARGV[2], tonumber(ARGV[3])
local marks = redis.call('ZRANGEBYSCORE', dedupe_key, '-inf', now, 'LIMIT', 0, chunk)
if #marks > 0 then redis.call('ZREM', dedupe_key, unpack(marks)) end
local gone = 0
if cutoff ~= '' then
  local finished = redis.call('ZRANGEBYSCORE', finished_key, '-inf', cutoff, 'LIMIT', 0, chunk)
  for _, member in ipairs(finished) do
    local sep = string.find(member, ':', 1, true)
    local c, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
    local dl = delivery_key(c, id)
    local state = redis.call('HGET', dl, 'state')
    if state then
      count(c, state, -1)
      redis.call('DEL', dl)
    end
    redis.call('ZREM', received_key(c), id)
    redis.call('ZREM', dead_key(c), id)
    redis.call('ZREM', finished_key, member)
    local ev = event_key(id)
    if redis.call('HINCRBY', ev, 'refs', -1) <= 0 then redis.call('DEL', ev) end
    gone = gone + 1
  end
end
return { #marks, gone }
