-- Where queued jobs stand: {completion rate ('' unknown), rank of each id (-1: not pending)}.
-- KEYS: pending. ARGV: prefix, now, job ids...
--#include common
local out = {completion_rate(ARGV[1], tonumber(ARGV[2]))}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('ZRANK', KEYS[1], ARGV[i]) or -1
end
return out
