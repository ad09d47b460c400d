-- Shared by the job scripts. KEYS[1] job hash, KEYS[2] its event stream, KEYS[3] the stats hash,
-- KEYS[4] the active set (non-terminal job ids scored by when the reaper should look at them),
-- KEYS[5] the pending set of the engine (queued generation jobs, scored by priority rank * 1e10 + submit time).
local terminal = {succeeded=true, failed=true, canceled=true, timed_out=true}
local BUCKETS = {--[[BUCKETS]]}
local function observe_in(stats, name, value)
  redis.call('HINCRBYFLOAT', stats, name .. '_sum', value)
  redis.call('HINCRBY', stats, name .. '_count', 1)
  for _, le in ipairs(BUCKETS) do
    if value <= tonumber(le) then redis.call('HINCRBY', stats, name .. '_bucket:' .. le, 1) end
  end
end
local function observe(name, value) observe_in(KEYS[3], name, value) end
-- Webhooks: when the job has a `webhook` and its filter (JSON list, default ["completed"]) holds the
-- event, add a delivery: hash {prefix}:webhook:{delivery id} (a snapshot of the job) and an entry in the
-- zset {prefix}:webhooks:due scored by when to send it. {prefix} is the stats key ({prefix}:stats) minus ':stats'.
local function notify_job(job, stats, event, now)
  local url = redis.call('HGET', job, 'webhook')
  if not url then return end
  local wanted = redis.call('HGET', job, 'webhook_events_filter') or '["completed"]'
  if not string.find(wanted, '"' .. event .. '"', 1, true) then return end
  local prefix = string.sub(stats, 1, -7)
  local id = redis.call('HGET', job, 'id')
  local msg = 'msg_' .. id .. '_' .. event .. '_' .. redis.call('HINCRBY', job, 'webhook_seq', 1)
  redis.call('HSET', prefix .. ':webhook:' .. msg, 'kind', 'job', 'subject', id, 'event', event, 'time', now,
             'url', url, 'attempt', 0, 'record', cjson.encode(redis.call('HGETALL', job)))
  redis.call('ZADD', prefix .. ':webhooks:due', now, msg)
end
local function notify(event, now) notify_job(KEYS[1], KEYS[3], event, now) end
-- An ended job keeps its request only for `retry`, and each owner's ended jobs keep theirs up to
-- KEPT_REQUEST_BYTES in all, newest first: past it the oldest lose theirs (retry then answers 409).
-- {prefix}:owner:{owner}:kept: job id -> request bytes; :kept:lapse: job id -> when its record expires; :kept:total.
local KEPT_REQUEST_BYTES = --[[KEPT_REQUEST_BYTES]]
local function keep_request(job, prefix, id, now, ttl)
  local size = redis.call('HSTRLEN', job, 'request')
  if size == 0 then return end
  local base = prefix .. ':owner:' .. (redis.call('HGET', job, 'owner') or 'anonymous') .. ':kept'
  local lapse, total = base .. ':lapse', base .. ':total'
  local function forget(other, drop)
    local bytes = redis.call('ZSCORE', base, other)
    if not bytes then return end
    redis.call('ZREM', base, other)
    redis.call('ZREM', lapse, other)
    redis.call('DECRBY', total, math.floor(tonumber(bytes)))
    if drop then redis.call('HDEL', prefix .. ':job:' .. other, 'request') end
  end
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', lapse, '-inf', now, 'LIMIT', 0, 100)) do forget(other, false) end
  forget(id, false)  -- a job closed twice counts once
  redis.call('ZADD', base, size, id)
  redis.call('ZADD', lapse, tonumber(now) + tonumber(ttl), id)
  local kept = redis.call('INCRBY', total, size)
  while kept > KEPT_REQUEST_BYTES do
    local oldest = redis.call('ZRANGE', lapse, 0, 0)[1]
    if not oldest or oldest == id then break end
    forget(oldest, true)
    kept = tonumber(redis.call('GET', total))
  end
  for _, key in ipairs({base, lapse, total}) do redis.call('EXPIRE', key, ttl) end
end
-- Move a job to a terminal status: out of the active, pending and held sets, `done` event, TTL, counters.
local function close_job(job, ev, stats, active, pending, status, now, ttl)
  local id = redis.call('HGET', job, 'id')
  local prefix = string.sub(stats, 1, -7)
  keep_request(job, prefix, id, now, ttl)
  redis.call('ZREM', active, id)
  redis.call('ZREM', prefix .. ':deadlines', id)
  if pending ~= '' then redis.call('ZREM', pending, id) end
  local own = redis.call('HGET', job, 'pending')  -- the pending set of the job's model
  if own and own ~= pending then redis.call('ZREM', own, id) end
  local held = redis.call('HGET', job, 'held')
  if held then redis.call('SREM', held, id) end
  redis.call('HSET', job, 'status', status, 'completed_at', now)
  redis.call('XADD', ev, '*', 'type', 'done', 'status', status)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', ev, ttl)
  local kind = redis.call('HGET', job, 'type') or 'generation'
  redis.call('HINCRBY', stats, 'jobs:' .. kind .. ':' .. status, 1)
  local started = redis.call('HGET', job, 'started_at')
  if started then observe_in(stats, 'run_seconds', tonumber(now) - tonumber(started)) end
  if started and kind == 'generation' then  -- recent completions: the queue position's time estimate
    redis.call('LPUSH', prefix .. ':done_times', now)
    redis.call('LTRIM', prefix .. ':done_times', 0, 255)
  end
  notify_job(job, stats, 'completed', now)
end
-- Generation completions per second over the last minute, from the last 256 completion times ('' when
-- none in it); when all 256 kept are recent, over the span they cover. Behind estimated_start_seconds.
local function completion_rate(prefix, now)
  local times = redis.call('LRANGE', prefix .. ':done_times', 0, -1)
  local recent, oldest = 0, now
  for _, raw in ipairs(times) do
    local t = tonumber(raw)
    if t > now - 60 and t <= now then
      recent = recent + 1
      if t < oldest then oldest = t end
    end
  end
  if recent == 0 then return '' end
  local span = 60
  if #times >= 256 and recent == #times then span = math.max(1, now - oldest) end
  return tostring(recent / span)
end
-- Free engine rows for a model's queued jobs: over its live workers, `max_batch` minus the jobs each
-- engine holds (0 when unknown). A queued job whose position is below it starts at the next claim.
local function free_slots(prefix, model, now, max_batch)
  if not model or model == '' or not max_batch or max_batch <= 0 then return 0 end
  local free = 0
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', prefix .. ':model:' .. model .. ':workers', now, '+inf')) do
    free = free + math.max(0, max_batch - redis.call('SCARD', prefix .. ':held:' .. w))
  end
  return free
end
-- Deadlines (Cancel-After / deadline_seconds): the record's `deadline` is an absolute time.
local DEADLINE_ERROR = --[[DEADLINE_EXCEEDED]]  -- the error object (JSON), from qwen_deploy/states.py
local function past_deadline(job, now)
  local d = tonumber(redis.call('HGET', job, 'deadline') or '')
  return d ~= nil and d <= tonumber(now)
end
local function close_at_deadline(job, stats, active, pending, now, ttl)
  redis.call('HSET', job, 'error', DEADLINE_ERROR, 'finish_reason', 'canceled', 'cancel', '1')
  close_job(job, job .. ':ev', stats, active, pending, 'canceled', now, ttl)
end
local function close(status, now, ttl)
  close_job(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5] or '', status, now, ttl)
end
