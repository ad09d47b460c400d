-- ARGV: now, status, ttl, last text delta, tokens, holder ('' = anyone),
-- the other samples' last deltas (json [[index, text], ...]), fields...
-- A late writer never overwrites a final state, and a worker that lost its claim cannot finish the job.
--#include common
local st = redis.call('HGET', KEYS[1], 'status')
if (not st) or terminal[st] then return 0 end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[6] then return 0 end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'type', 'token', 'text', ARGV[4], 'tokens', ARGV[5])
end
if ARGV[7] ~= '' and ARGV[7] ~= '[]' then
  for _, d in ipairs(cjson.decode(ARGV[7])) do
    redis.call('XADD', KEYS[2], '*', 'type', 'token', 'text', d[2], 'tokens', ARGV[5], 'index', tostring(d[1]))
  end
end
redis.call('HINCRBY', KEYS[3], 'tokens', tonumber(ARGV[5]) or 0)
close(ARGV[2], ARGV[1], ARGV[3])
return 1
