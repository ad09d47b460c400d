-- Shared by the job scripts. KEYS[1] job hash, KEYS[2] its event stream, KEYS[3] the stats hash,
-- KEYS[4] the active set (non-terminal job ids scored by when the reaper should look at them).
local terminal = {succeeded=true, failed=true, canceled=true, timed_out=true}
local BUCKETS = {--[[BUCKETS]]}
local function observe(name, value)
  redis.call('HINCRBYFLOAT', KEYS[3], name .. '_sum', value)
  redis.call('HINCRBY', KEYS[3], name .. '_count', 1)
  for _, le in ipairs(BUCKETS) do
    if value <= tonumber(le) then redis.call('HINCRBY', KEYS[3], name .. '_bucket:' .. le, 1) end
  end
end
-- Webhooks: when the job has a `webhook` and its filter (JSON list, default ["completed"]) holds the
-- event, add a delivery: hash {prefix}:webhook:{delivery id} (a snapshot of the job) and an entry in the
-- zset {prefix}:webhooks:due scored by when to send it. {prefix} is KEYS[3] ({prefix}:stats) minus ':stats'.
local function notify(event, now)
  local url = redis.call('HGET', KEYS[1], 'webhook')
  if not url then return end
  local wanted = redis.call('HGET', KEYS[1], 'webhook_events_filter') or '["completed"]'
  if not string.find(wanted, '"' .. event .. '"', 1, true) then return end
  local prefix = string.sub(KEYS[3], 1, -7)
  local id = redis.call('HGET', KEYS[1], 'id')
  local msg = 'msg_' .. id .. '_' .. event .. '_' .. redis.call('HINCRBY', KEYS[1], 'webhook_seq', 1)
  redis.call('HSET', prefix .. ':webhook:' .. msg, 'kind', 'job', 'subject', id, 'event', event, 'time', now,
             'url', url, 'attempt', 0, 'record', cjson.encode(redis.call('HGETALL', KEYS[1])))
  redis.call('ZADD', prefix .. ':webhooks:due', now, msg)
end
local function close(status, now, ttl)
  redis.call('ZREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
  redis.call('HSET', KEYS[1], 'status', status, 'completed_at', now)
  redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', status)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  local kind = redis.call('HGET', KEYS[1], 'type') or 'generation'
  redis.call('HINCRBY', KEYS[3], 'jobs:' .. kind .. ':' .. status, 1)
  local started = redis.call('HGET', KEYS[1], 'started_at')
  if started then observe('run_seconds', tonumber(now) - tonumber(started)) end
  notify('completed', now)
end
