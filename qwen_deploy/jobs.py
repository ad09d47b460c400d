"""Job records in Redis: the single source of truth for a job's state, shared by web and worker.

A job is a hash ``{prefix}:job:{id}`` plus an event stream ``{prefix}:job:{id}:ev`` (token deltas,
status changes and a final ``done``). State changes that must not race (submit, start, cancel,
finish) are Lua scripts, so each is one atomic round trip. A terminal record is never rewritten.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

TERMINAL = frozenset({"succeeded", "failed", "canceled", "timed_out"})
HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
JOB_ID_PREFIX = "job_"

# Shared by the scripts below. KEYS[1] job hash, KEYS[2] its event stream, KEYS[3] the stats hash,
# KEYS[4] the active set (non-terminal job ids scored by when the reaper should look at them).
_LUA_COMMON = """
local terminal = {succeeded=true, failed=true, canceled=true, timed_out=true}
local BUCKETS = {%s}
local function observe(name, value)
  redis.call('HINCRBYFLOAT', KEYS[3], name .. '_sum', value)
  redis.call('HINCRBY', KEYS[3], name .. '_count', 1)
  for _, le in ipairs(BUCKETS) do
    if value <= tonumber(le) then redis.call('HINCRBY', KEYS[3], name .. '_bucket:' .. le, 1) end
  end
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
end
""" % ", ".join(f"'{b}'" for b in HISTOGRAM_BUCKETS)

# KEYS: job, queue, idem ('' when none), active. ARGV: ttl, max_depth, message, job id, reap at, fields...
SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', ARGV[4]} end
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'duplicate', existing} end
end
local depth = redis.call('LLEN', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[1], 'message', ARGV[3], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('LPUSH', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1]) end
return {'ok', ARGV[4]}
"""

# ARGV: now, worker, max_deliveries, exhausted error json, ttl, reap at (if the worker vanishes)
START = _LUA_COMMON + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', ''} end
if terminal[st] then return {'skip', st} end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
if n > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
  close('failed', ARGV[1], ARGV[5])
  return {'exhausted', tostring(n)}
end
if n == 1 then observe('queue_seconds', tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'created_at'))) end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2],
           'tokens', 0, 'text', '')
redis.call('ZADD', KEYS[4], ARGV[6], redis.call('HGET', KEYS[1], 'id'))
redis.call('XADD', KEYS[2], '*', 'type', 'status', 'status', 'running', 'attempt', n)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'run', redis.call('HGET', KEYS[1], 'request')}
"""

# ARGV: now, ttl
CANCEL = _LUA_COMMON + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if terminal[st] then return 'terminal:' .. st end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'finish_reason', 'canceled')
  close('canceled', ARGV[1], ARGV[2])
  return 'canceled'
end
return 'canceling'
"""

# ARGV: now, status, ttl, last text delta, tokens, fields...
FINISH = _LUA_COMMON + """
local st = redis.call('HGET', KEYS[1], 'status')
if (not st) or terminal[st] then return 0 end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'type', 'token', 'text', ARGV[4], 'tokens', ARGV[5])
end
redis.call('HINCRBY', KEYS[3], 'tokens', tonumber(ARGV[5]) or 0)
close(ARGV[2], ARGV[1], ARGV[3])
return 1
"""


def new_id(prefix: str = JOB_ID_PREFIX) -> str:
    """A sortable id whose first 12 hex digits after the prefix are the creation time in ms."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def new_job_id() -> str:
    return new_id(JOB_ID_PREFIX)


def id_time(any_id: str, prefix: str = JOB_ID_PREFIX) -> float | None:
    """Creation time encoded in a well-formed id, else None."""
    body = any_id.removeprefix(prefix)
    if not any_id.startswith(prefix) or len(body) != 28:
        return None
    try:
        int(body, 16)
    except ValueError:
        return None
    return int(body[:12], 16) / 1000


def strings(fields: dict[str, Any]) -> dict[str, str]:
    """Hash fields as strings: None dropped, non-strings as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}


def _flat(fields: dict[str, Any]) -> list[str]:
    return [part for item in strings(fields).items() for part in item]


@dataclass(frozen=True)
class SubmitResult:
    status: str  # ok | duplicate | full
    job_id: str
    depth: int = 0


class JobStore:
    """Reads and writes job records; every method is one Redis round trip."""

    def __init__(self, client: redis.Redis, prefix: str = "qd", ttl: int = 86400, reap_after: float = 600.0) -> None:
        self.r = client
        self.prefix = prefix
        self.ttl = ttl
        self.reap_after = reap_after
        self._submit = client.register_script(SUBMIT)
        self._start = client.register_script(START)
        self._cancel = client.register_script(CANCEL)
        self._finish = client.register_script(FINISH)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:ev"

    def stats_key(self) -> str:
        return f"{self.prefix}:stats"

    def active_key(self) -> str:
        return f"{self.prefix}:active"

    def _keys(self, job_id: str) -> list[str]:
        return [self.key(job_id), self.events_key(job_id), self.stats_key(), self.active_key()]

    def idem_key(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def submit(self, job_id: str, queue: str, message: str, fields: dict[str, Any],
               max_depth: int, idempotency_key: str | None = None) -> SubmitResult:
        """Write the record and enqueue the message, unless the key was seen or the queue is full."""
        fields = {"id": job_id, "status": "queued", "queue": queue, "created_at": repr(time.time()),
                  "tokens": "0", "deliveries": "0", **fields}
        idem = self.idem_key(idempotency_key) if idempotency_key else ""
        status, value = self._submit(
            keys=[self.key(job_id), queue, idem, self.active_key()],
            args=[self.ttl, max_depth, message, job_id, repr(time.time() + self.reap_after), *_flat(fields)],
        )
        status, value = _text(status), _text(value)
        if status == "full":
            return SubmitResult("full", job_id, int(value))
        return SubmitResult(status, value)

    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(self.key(job_id))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    def start(self, job_id: str, worker: str, max_deliveries: int, running_for: float = 3600.0) -> tuple[str, str]:
        """Mark running and count the delivery. Returns (run, request json) or (skip|missing|exhausted, why)."""
        error = {"code": "worker_lost", "message": (
            f"the worker running this job died {max_deliveries} time(s); the job was not retried again")}
        status, value = self._start(
            keys=self._keys(job_id),
            args=[repr(time.time()), worker, max_deliveries, json.dumps(error), self.ttl,
                  repr(time.time() + running_for)],
        )
        return _text(status), _text(value)

    def cancel(self, job_id: str) -> str:
        """Cancel: 'canceled' (was queued), 'canceling' (running), 'terminal:<status>', or 'missing'."""
        return _text(self._cancel(keys=self._keys(job_id),
                                  args=[repr(time.time()), self.ttl]))

    def finish(self, job_id: str, status: str, fields: dict[str, Any], delta: str = "", tokens: int = 0) -> bool:
        """Move a job to a terminal status, streaming the last text delta; False if it already was terminal."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        done = self._finish(keys=self._keys(job_id),
                            args=[repr(time.time()), status, self.ttl, delta, tokens, *_flat(fields)])
        return bool(done)

    def progress(self, job_id: str, tokens: int, text: str, delta: str) -> bool:
        """Publish partial output; return True when cancellation was requested."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key(job_id), mapping={"tokens": tokens, "text": text})
        if delta:
            pipe.xadd(self.events_key(job_id), {"type": "token", "text": delta, "tokens": tokens})
        pipe.hget(self.key(job_id), "cancel")
        return _text(pipe.execute()[-1]) == "1"

    def report(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Publish the progress of a non-generation job; return True when cancellation was requested."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key(job_id), "progress", json.dumps(progress))
        pipe.xadd(self.events_key(job_id), {"type": "progress", "progress": json.dumps(progress)})
        pipe.hget(self.key(job_id), "cancel")
        return _text(pipe.execute()[-1]) == "1"

    def read_events(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Events after last_id, waiting up to block_ms for the first one."""
        reply = self.r.xread({self.events_key(job_id): last_id}, block=max(block_ms, 1), count=256)
        if not reply:
            return []
        return [(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in reply[0][1]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def public_job(record: dict[str, str]) -> dict[str, Any]:
    """The job object of the HTTP API, from a stored record."""
    def num(name: str) -> float | None:
        return float(record[name]) if record.get(name) else None

    def obj(name: str) -> Any:
        return json.loads(record[name]) if record.get(name) else None

    status = record.get("status", "queued")
    kind = record.get("type", "generation")
    if kind == "generation":
        progress = {"tokens": int(record.get("tokens") or 0), "max_new_tokens": int(record.get("max_new_tokens") or 0)}
        output = None
        if status != "queued" or record.get("text"):
            output = {"text": record.get("text", ""), "finish_reason": record.get("finish_reason") or None,
                      "usage": obj("usage")}
    else:
        progress, output = obj("progress") or {}, obj("result")
    return {
        "id": record["id"],
        "object": "job",
        "type": kind,
        "status": status,
        "queue": record.get("queue"),
        "created_at": num("created_at"),
        "started_at": num("started_at"),
        "completed_at": num("completed_at"),
        "attempts": int(record.get("deliveries") or 0),
        "progress": progress,
        "output": output,
        "error": obj("error"),
    }
