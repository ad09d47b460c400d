-- A worker hands a running job back (its model is being reloaded): the job stays `running` with what it streamed
-- (`out_ids`, `text`) but no holder and no lease, first in its model's pending set, so the next claim of an engine
-- of its model resumes it from those tokens, exactly as after a worker loss. A hand-back is not counted against
-- `max_deliveries` (`handbacks`). Only the job's holder can hand it back.
-- KEYS: job, active, held (this worker's set), pending (the job's model's). ARGV: worker, now, reap at.
-- Returns 1 when handed back, 0 when the job is no longer this worker's.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('HSET', KEYS[1], 'worker', '', 'lease_until', ARGV[2])
redis.call('HDEL', KEYS[1], 'held')
redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
redis.call('SREM', KEYS[3], id)
redis.call('ZADD', KEYS[4], 0, id)  -- ahead of every queued job: it had started
redis.call('ZADD', KEYS[2], ARGV[3], id)  -- the stuck-job check looks again then, as at a submit
return 1
