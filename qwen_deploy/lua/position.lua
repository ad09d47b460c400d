-- Where queued jobs stand: {completion rate ('' unknown), then per id: its rank (-1: not pending) and
-- the free engine rows of its model (see free_slots)}.
-- KEYS: pending (of the default model). ARGV: prefix, now, job key prefix, max_batch, default model, job ids...
-- A job records its own model's pending set (`pending`) and model (none: the default); its rank is taken there.
--#include common
local now, max_batch = tonumber(ARGV[2]), tonumber(ARGV[4])
local out = {completion_rate(ARGV[1], now)}
local free = {}
for i = 6, #ARGV do
  local pending, model = unpack(redis.call('HMGET', ARGV[3] .. ARGV[i], 'pending', 'model'))
  out[#out + 1] = redis.call('ZRANK', pending or KEYS[1], ARGV[i]) or -1
  model = model or ARGV[5]
  if free[model] == nil then free[model] = free_slots(ARGV[1], model, now, max_batch) end
  out[#out + 1] = free[model]
end
return out
