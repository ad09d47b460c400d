-- One argument, a JSON object (ttl):
--   keys: the keys it touches, by name; a key left out is not used: job, queue, idem (the idempotency key),
--     active, index (the owner's job index), inflight (the owner's in-flight set), pending (the model's pending
--     set: only for an engine job), served (the model's live workers: checked for unserved_cap), deadlines
--     (only for a job with a deadline), fair (the keys' virtual clocks: start-time fair queueing)
--   prefix (the key prefix), id (the job id), message (the Celery message), ttl, max_depth, reap_at,
--   fields (the record: an object of strings), body (hash of the request, kept with the idempotency key),
--   max_inflight (0: no cap), job_key (the job hash prefix, to prune finished ids from the in-flight set),
--   index_floor (ids below it have expired: trimmed from the index), index_max (index length kept),
--   pending_score (priority rank * 1e10 + submit time), deadline (absolute time), now and unserved_cap
--   (with keys.served: no live worker serves the model and its pending set holds that many), rank, owner,
--   fair_cost, model (its alias) and max_batch (engine rows per worker: the free rows behind the estimate).
-- The record has no TTL until it is terminal (a job queued longer than the TTL must still end).
-- Returns {'ok', id[, queue position, completion rate, free rows]} (for an engine job: see
-- qwen_deploy/lifecycle.py) | {'duplicate', id} | {'reused', id} | {'full', depth} | {'inflight', count}
-- | {'unavailable', pending}.
-- The owner's index is a sorted set with every score 0: ids embed their creation time, so lexical
-- order is creation order (GET /v1/jobs pages it newest first with ZREVRANGEBYLEX).
--#include common
local opt = cjson.decode(ARGV[1])
local k, id, ttl = opt.keys, opt.id, opt.ttl
if redis.call('EXISTS', k.job) == 1 then return {'duplicate', id} end
if k.idem then
  local existing = redis.call('HMGET', k.idem, 'id', 'body')
  if existing[1] then
    if existing[2] ~= opt.body then return {'reused', existing[1]} end
    return {'duplicate', existing[1]}
  end
end
local depth = redis.call('LLEN', k.queue)
if depth >= tonumber(opt.max_depth) then return {'full', tostring(depth)} end
if k.served and redis.call('ZCOUNT', k.served, opt.now, '+inf') == 0 then
  local queued = redis.call('ZCARD', k.pending)
  if queued >= tonumber(opt.unserved_cap) then return {'unavailable', tostring(queued)} end
end
local cap = tonumber(opt.max_inflight) or 0
if cap > 0 and redis.call('ZCARD', k.inflight) >= cap then
  -- Drop the oldest ids that finished or expired: only at the cap, and at most 32 per submit, so a
  -- client hammering at its cap costs Redis little (jobs finish roughly in submit order).
  for _, other in ipairs(redis.call('ZRANGE', k.inflight, 0, 31)) do
    local st = redis.call('HGET', opt.job_key .. other, 'status')
    if (not st) or st == 'succeeded' or st == 'failed' or st == 'canceled' or st == 'timed_out' then
      redis.call('ZREM', k.inflight, other)
    end
  end
  local n = redis.call('ZCARD', k.inflight)
  if n >= cap then return {'inflight', tostring(n)} end
end
local record = {'message', opt.message}
if k.pending then  -- closing the job removes it from its model's pending set
  record[3], record[4] = 'pending', k.pending
end
for name, value in pairs(opt.fields) do
  record[#record + 1] = name
  record[#record + 1] = value
end
redis.call('HSET', k.job, unpack(record))
redis.call('ZADD', k.active, opt.reap_at, id)
if k.pending then
  local score = opt.pending_score or redis.call('HGET', k.job, 'created_at')
  if k.fair then
    -- Start-time fair queueing across keys: a job starts (in virtual time) when its key's previous job
    -- ends, and never before now; each job advances its key's clock by `fair_cost` seconds. One key's
    -- jobs keep their FIFO order, a lone key is served in submit order, and a key that floods the queue
    -- pushes only its own jobs back: another key's new job lands ahead of that backlog.
    local clock = tonumber(redis.call('HGET', k.fair, opt.owner) or '0') or 0
    local start = math.max(tonumber(opt.now), clock)
    redis.call('HSET', k.fair, opt.owner, string.format('%.6f', start + tonumber(opt.fair_cost)))
    redis.call('EXPIRE', k.fair, ttl)
    score = tonumber(opt.rank) * 1e10 + start
  end
  redis.call('ZADD', k.pending, score, id)
end
if k.deadlines then redis.call('ZADD', k.deadlines, opt.deadline, id) end
redis.call('LPUSH', k.queue, opt.message)
if k.idem then
  redis.call('HSET', k.idem, 'id', id, 'body', opt.body)
  redis.call('EXPIRE', k.idem, ttl)
end
if k.index then
  redis.call('ZADD', k.index, 0, id)
  redis.call('ZREMRANGEBYLEX', k.index, '-', '(' .. opt.index_floor)
  redis.call('ZREMRANGEBYRANK', k.index, 0, -tonumber(opt.index_max) - 1)  -- keep the newest index_max
  redis.call('EXPIRE', k.index, ttl)
end
if cap > 0 then
  redis.call('ZADD', k.inflight, 0, id)
  redis.call('EXPIRE', k.inflight, ttl)
end
if k.pending then
  return {'ok', id, redis.call('ZRANK', k.pending, id),
          completion_rate(opt.prefix, tonumber(opt.now)), free_slots(opt.prefix, opt.model, opt.now, opt.max_batch)}
end
return {'ok', id}
