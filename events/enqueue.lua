-- Numbers the elements of one quota-ledger message and enqueues it, atomically (SPEC §9):
-- a failed call burns no number. Publishers in other languages run this same script
-- (docs/events.md "Publishing from other languages").
--
-- KEYS[1]  the sequence hash "quota_ledger.sequence": field "~epoch" (created once from the
--          broker's own clock, Redis TIME, in microseconds) and one counter per instance id,
--          so that epoch and counters vanish together
-- KEYS[2]  the events queue, the Redis list "quota_ledger.events"
-- ARGV[1]  "~epoch"
-- ARGV[2]  the message's JSON text up to where its "sequence" keyword argument's value goes
-- ARGV[3]  the rest of the message's JSON text
-- ARGV[4…] the instance id of each element of the message, in order
--
-- The body is a JSON string inside the envelope, so the quotes written here are escaped;
-- instance ids need no other escaping (their charset is [A-Za-z0-9._:-]).
-- Returns the epoch.
local epoch = redis.call('HGET', KEYS[1], ARGV[1])
if not epoch then
  local now = redis.call('TIME')
  epoch = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('HSET', KEYS[1], ARGV[1], epoch)
end
local numbers = {}
for i = 4, #ARGV do
  local n = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
  numbers[#numbers + 1] = '[\\"' .. ARGV[i] .. '\\",' .. n .. ']'
end
local sequence = '{\\"epoch\\":' .. epoch
  .. ',\\"numbers\\":[' .. table.concat(numbers, ',') .. ']}'
redis.call('LPUSH', KEYS[2], ARGV[2] .. sequence .. ARGV[3])
return epoch
