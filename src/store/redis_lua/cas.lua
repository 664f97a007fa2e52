-- Compare-and-set of one record: a string key (ARGV[1] = "") or a hash field (ARGV[1] = the
-- field). ARGV: field, expected_present ("1"/"0"), expected, new, channel, notice ("" for none).
-- The caller read the record, applied the merge rules in Rust, and writes the result only if
-- nobody wrote in between (else it reads again): newest-wins stays one rule in one place.
-- Returns 1 written (and the notice published), 0 changed meanwhile.
local field, present, expected, new = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current
if field == '' then
  current = redis.call('GET', KEYS[1])
else
  current = redis.call('HGET', KEYS[1], field)
end
if present == '1' then
  if current ~= expected then return 0 end
elseif current then
  return 0
end
if field == '' then
  redis.call('SET', KEYS[1], new)
else
  redis.call('HSET', KEYS[1], field, new)
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
