-- KEYS: a zset scored by due time. ARGV: now, lease seconds, max entries.
-- Returns the due members and pushes each one `lease` seconds ahead: a sender that dies leaves its
-- entry to be claimed again when the lease runs out.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), member)
end
return due
