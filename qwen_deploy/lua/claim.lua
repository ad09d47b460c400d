-- The engine's claim: take queued generation jobs (and jobs whose worker stopped renewing its lease)
-- into this worker's engine, atomically: queued|orphaned -> running, worker, attempt, lease. The job's
-- queued message (a wake-up for idle workers) is removed: the record, not the message, says who runs it.
-- KEYS: pending, active, stats, held (this worker's set of claimed job ids).
-- ARGV[1], a JSON object: prefix, now, worker, lease_until, max_deliveries, ttl, exhausted (the error of a job
--   past its deliveries), room, takeover (a holder known to be dead; absent: none), job_id (absent: scan pending
--   and expired leases), model (this engine's alias), default_model (a record without `model` is the default's).
-- Returns a list of JSON objects {outcome, id, detail, request, attempt, out_ids, text}; outcome is
-- run | mine | busy | skip | missing | exhausted | other (another model's job: never claimed)
-- (detail: the holder for busy, the status for skip, the job's model for other, the deadline for run).
-- A job past its deadline is closed `canceled` (deadline_exceeded) instead of claimed.
-- Pending is scored by priority rank * 1e10 + submit time: high, then normal, then low, FIFO within.
--#include common
local opt = cjson.decode(ARGV[1])
local prefix, now_s, me, lease = opt.prefix, opt.now, opt.worker, opt.lease_until
local now = tonumber(now_s)
local max_deliveries, ttl, exhausted, room = opt.max_deliveries, opt.ttl, opt.exhausted, opt.room
local takeover, my_model, default_model = opt.takeover or '', opt.model, opt.default_model
local out = {}
local function put(outcome, id, detail, req, attempt, ids, text)
  out[#out + 1] = cjson.encode({outcome = outcome, id = id, detail = detail or '', request = req or '',
                                attempt = tonumber(attempt or '0'), out_ids = ids or '', text = text or ''})
end
local function claim(id)
  local job = prefix .. ':job:' .. id
  local st = redis.call('HGET', job, 'status')
  if not st then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    put('missing', id)
    return false
  end
  if terminal[st] then
    redis.call('ZREM', KEYS[1], id)
    put('skip', id, st)
    return false
  end
  local model = redis.call('HGET', job, 'model') or default_model
  if model ~= my_model then put('other', id, model) return false end
  if st == 'running' then
    local holder = redis.call('HGET', job, 'worker') or ''
    if holder == me then put('mine', id, holder) return false end
    local until_ = tonumber(redis.call('HGET', job, 'lease_until') or '0') or 0
    if until_ > now and (takeover == '' or holder ~= takeover) then put('busy', id, holder) return false end
    local old = redis.call('HGET', job, 'held')
    if old then redis.call('SREM', old, id) end
  end
  if past_deadline(job, now) then  -- queued (or orphaned) past its deadline: never started again
    close_at_deadline(job, KEYS[3], KEYS[2], KEYS[1], now_s, ttl)
    put('skip', id, 'canceled')
    return false
  end
  local n = redis.call('HINCRBY', job, 'deliveries', 1)
  if n - tonumber(redis.call('HGET', job, 'handbacks') or '0') > max_deliveries then  -- hand-backs are no failures
    redis.call('HSET', job, 'error', exhausted, 'finish_reason', 'error')
    close_job(job, job .. ':ev', KEYS[3], KEYS[2], KEYS[1], 'failed', now_s, ttl)
    put('exhausted', id, tostring(n))
    return false
  end
  if n == 1 then
    observe_in(KEYS[3], 'queue_seconds', now - tonumber(redis.call('HGET', job, 'created_at')))
    redis.call('HSET', job, 'started_at', now_s, 'tokens', 0, 'text', '')
  end
  local qm = redis.call('HMGET', job, 'queue', 'message')
  if qm[1] and qm[2] then redis.call('LREM', prefix .. ':' .. qm[1], 1, qm[2]) end  -- its wake-up message is not needed now
  redis.call('HSET', job, 'status', 'running', 'worker', me, 'lease_until', lease, 'held', KEYS[4])
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], lease, id)
  redis.call('SADD', KEYS[4], id)
  redis.call('XADD', job .. ':ev', '*', 'type', 'status', 'status', 'running', 'attempt', n)
  if n == 1 then notify_job(job, KEYS[3], 'start', now_s) end
  local f = redis.call('HMGET', job, 'request', 'out_ids', 'text')
  put('run', id, redis.call('HGET', job, 'deadline') or '', f[1], tostring(n), f[2], f[3])
  return true
end
if opt.job_id then
  claim(opt.job_id)
  return out
end
if takeover ~= '' then  -- every job the dead holder had claimed
  for _, id in ipairs(redis.call('SMEMBERS', prefix .. ':held:' .. takeover)) do
    if room <= 0 then break end
    if claim(id) then room = room - 1 end
  end
end
if room > 0 then  -- leases that ran out: their worker died or was cut off (other models' jobs are passed over)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, room + 32)) do
    if room <= 0 then break end
    local job = prefix .. ':job:' .. id
    local f = redis.call('HMGET', job, 'lease_until', 'status', 'model')
    if f[1] and f[2] == 'running' and (f[3] or default_model) == my_model then
      if claim(id) then room = room - 1 end
    end
  end
end
while room > 0 do
  local ids = redis.call('ZRANGE', KEYS[1], 0, room - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if claim(id) then room = room - 1 else redis.call('ZREM', KEYS[1], id) end
  end
end
return out
