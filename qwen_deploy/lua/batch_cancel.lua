-- KEYS: batch. ARGV: now, owner ('' for any). Returns the status before the call; 'missing' also for
-- another owner's batch, left untouched (records without an owner are "anonymous").
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if ARGV[2] and ARGV[2] ~= '' and (redis.call('HGET', KEYS[1], 'owner') or 'anonymous') ~= ARGV[2] then
  return 'missing'
end
if st == 'validating' or st == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
end
return st
