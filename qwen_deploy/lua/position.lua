-- Where queued jobs stand: {completion rate ('' unknown), rank of each id (-1: not pending)}.
-- KEYS: pending (of the default model). ARGV: prefix, now, job key prefix, job ids...
-- A job records its own model's pending set (`pending`); its rank is taken there.
--#include common
local out = {completion_rate(ARGV[1], tonumber(ARGV[2]))}
for i = 4, #ARGV do
  local pending = redis.call('HGET', ARGV[3] .. ARGV[i], 'pending') or KEYS[1]
  out[#out + 1] = redis.call('ZRANK', pending, ARGV[i]) or -1
end
return out
