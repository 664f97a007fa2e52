-- Shared by the hand-off queue's scripts (src/store/redis_queue.rs prepends it to each).
--
-- KEYS[1] is the app's key base, "<prefix>:{<app_id>}": every key a script touches starts with
-- it, so all of them share the hash tag and live in one cluster slot. Times and counts arrive as
-- decimal strings formatted by Rust and are stored as those same strings (Lua numbers are
-- doubles: they are used for comparisons only, never written back as times).

local base = KEYS[1]

local function delivery_key(c, id) return base .. ':delivery:' .. c .. ':' .. id end
local function event_key(id) return base .. ':event:' .. id end
local function counters_key(c) return base .. ':counters:' .. c end
local function due_key(c) return base .. ':due:' .. c end
local function pending_key(c) return base .. ':pending:' .. c end
local function dead_key(c) return base .. ':dead:' .. c end
local function received_key(c) return base .. ':received:' .. c end
local finished_key = base .. ':finished'
local dedupe_key = base .. ':dedupe'

-- A delivery's state as stored: 0 pending, 1 delivered, 2 dead (queue::State).
local STATE_COUNTER = { ['0'] = 'pending', ['1'] = 'delivered', ['2'] = 'dead' }

-- Move a consumer's counter for `state` by `by`, never below zero.
local function count(c, state, by)
  local field = STATE_COUNTER[state]
  if not field then return end
  local n = redis.call('HINCRBY', counters_key(c), field, by)
  if n < 0 then redis.call('HSET', counters_key(c), field, '0') end
end

-- Make a delivery pending, due at `due`, attempts reset (a new enqueue or a redeliver).
local function set_pending(c, id, received, due)
  redis.call('HSET', delivery_key(c, id), 'state', '0', 'attempts', '0', 'due', due,
    'received', received, 'finished', '0', 'err', '')
  redis.call('ZADD', due_key(c), due, id)
  redis.call('ZADD', pending_key(c), received, id)
  redis.call('ZADD', received_key(c), received, id)
  redis.call('ZREM', dead_key(c), id)
  redis.call('ZREM', finished_key, c .. ':' .. id)
end

-- The server's clock in microseconds, as a string: orders last errors across apps.
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

