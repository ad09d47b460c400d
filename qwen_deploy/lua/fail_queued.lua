-- KEYS: job, events, stats, active, pending (the default model's; the job's own is read from the record).
-- ARGV: now, ttl, fields... Fails a job that is still queued (never one a worker has claimed since).
-- Returns 1 when it failed the job, else 0.
--#include common
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
close('failed', ARGV[1], ARGV[2])
return 1
