-- KEYS: the due zset. ARGV: now, lease seconds, defer seconds, how many members to claim, then the
-- members to claim, then the members to defer.
-- Claims (pushes `lease` ahead) each listed member that is still due, and pushes each member to defer
-- `defer` seconds ahead if it is still due; returns the members claimed. A member another sender has
-- claimed meanwhile is not due any more and is left alone.
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[4])
local claimed = {}
for i = 5, #ARGV do
  local member = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= now then
    if i < 5 + n then
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member)
      claimed[#claimed + 1] = member
    else
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), member)
    end
  end
end
return claimed
