-- KEYS: batch. ARGV: now. Returns the status before the call.
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'validating' or st == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
end
return st
