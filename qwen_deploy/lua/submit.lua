-- KEYS: job, queue, idem ('' when none), active, owner's job index, owner's in-flight set,
-- pending ('' when the job is not for the engine), the model's live workers ('' = no check),
-- deadlines ('' when the job has none), the keys' virtual clocks ('' = plain FIFO within a priority).
-- The record has no TTL until it is terminal (a job queued longer than the TTL must still end).
-- ARGV: ttl, max_depth, message, job id, reap at, options (JSON), the record's fields (JSON object of strings).
-- options: body (hash of the request, kept with the idempotency key), max_inflight (0: no cap),
-- job_key (the job hash prefix, to prune finished ids from the in-flight set), index_floor (ids
-- below it have expired: trimmed from the index), index_max (index length kept), pending_score
-- (priority rank * 1e10 + submit time), deadline (absolute time, when KEYS[9] is given), now and
-- unserved_cap (with KEYS[8]: no live worker serves the model and its pending set holds that many),
-- model (its alias) and max_batch (engine rows per worker: the free rows behind the estimate).
-- Returns {'ok', id[, queue position, completion rate, free rows]} (for an engine job: see
-- qwen_deploy/lifecycle.py) | {'duplicate', id} | {'reused', id} | {'full', depth} | {'inflight', count}
-- | {'unavailable', pending}.
-- The owner's index is a sorted set with every score 0: ids embed their creation time, so lexical
-- order is creation order (GET /v1/jobs pages it newest first with ZREVRANGEBYLEX).
--#include common
local opt = cjson.decode(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', ARGV[4]} end
if KEYS[3] ~= '' then
  local existing = redis.call('HMGET', KEYS[3], 'id', 'body')
  if existing[1] then
    if existing[2] ~= opt.body then return {'reused', existing[1]} end
    return {'duplicate', existing[1]}
  end
end
local depth = redis.call('LLEN', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
if KEYS[8] ~= '' and redis.call('ZCOUNT', KEYS[8], opt.now, '+inf') == 0 then
  local queued = redis.call('ZCARD', KEYS[7])
  if queued >= tonumber(opt.unserved_cap) then return {'unavailable', tostring(queued)} end
end
local cap = tonumber(opt.max_inflight) or 0
if cap > 0 and redis.call('ZCARD', KEYS[6]) >= cap then
  -- Drop the oldest ids that finished or expired: only at the cap, and at most 32 per submit, so a
  -- client hammering at its cap costs Redis little (jobs finish roughly in submit order).
  for _, id in ipairs(redis.call('ZRANGE', KEYS[6], 0, 31)) do
    local st = redis.call('HGET', opt.job_key .. id, 'status')
    if (not st) or st == 'succeeded' or st == 'failed' or st == 'canceled' or st == 'timed_out' then
      redis.call('ZREM', KEYS[6], id)
    end
  end
  local n = redis.call('ZCARD', KEYS[6])
  if n >= cap then return {'inflight', tostring(n)} end
end
local record = {'message', ARGV[3]}
if KEYS[7] ~= '' then  -- closing the job removes it from its model's pending set
  record[3], record[4] = 'pending', KEYS[7]
end
for name, value in pairs(cjson.decode(ARGV[7])) do
  record[#record + 1] = name
  record[#record + 1] = value
end
redis.call('HSET', KEYS[1], unpack(record))
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
if KEYS[7] ~= '' then
  local score = opt.pending_score or redis.call('HGET', KEYS[1], 'created_at')
  if KEYS[10] and KEYS[10] ~= '' then
    -- Start-time fair queueing across keys: a job starts (in virtual time) when its key's previous job
    -- ends, and never before now; each job advances its key's clock by `fair_cost` seconds. One key's
    -- jobs keep their FIFO order, a lone key is served in submit order, and a key that floods the queue
    -- pushes only its own jobs back: another key's new job lands ahead of that backlog.
    local clock = tonumber(redis.call('HGET', KEYS[10], opt.owner) or '0') or 0
    local start = math.max(tonumber(opt.now), clock)
    redis.call('HSET', KEYS[10], opt.owner, string.format('%.6f', start + tonumber(opt.fair_cost)))
    redis.call('EXPIRE', KEYS[10], ARGV[1])
    score = tonumber(opt.rank) * 1e10 + start
  end
  redis.call('ZADD', KEYS[7], score, ARGV[4])
end
if KEYS[9] and KEYS[9] ~= '' then redis.call('ZADD', KEYS[9], opt.deadline, ARGV[4]) end
redis.call('LPUSH', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then
  redis.call('HSET', KEYS[3], 'id', ARGV[4], 'body', opt.body)
  redis.call('EXPIRE', KEYS[3], ARGV[1])
end
if KEYS[5] ~= '' then
  redis.call('ZADD', KEYS[5], 0, ARGV[4])
  redis.call('ZREMRANGEBYLEX', KEYS[5], '-', '(' .. opt.index_floor)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -tonumber(opt.index_max) - 1)  -- keep the newest index_max
  redis.call('EXPIRE', KEYS[5], ARGV[1])
end
if cap > 0 then
  redis.call('ZADD', KEYS[6], 0, ARGV[4])
  redis.call('EXPIRE', KEYS[6], ARGV[1])
end
if KEYS[7] ~= '' then
  local prefix = string.sub(KEYS[4], 1, -8)  -- KEYS[4] is {prefix}:active
  return {'ok', ARGV[4], redis.call('ZRANK', KEYS[7], ARGV[4]),
          completion_rate(prefix, tonumber(opt.now)), free_slots(prefix, opt.model, opt.now, opt.max_batch)}
end
return {'ok', ARGV[4]}
