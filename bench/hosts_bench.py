"""Host loss and partition figures, with network namespaces as hosts (root and `ip netns` needed).

    sudo uv run python bench/hosts_bench.py [--rounds 1] [--cut 15] [--idle-cut 10]

Each round makes a Redis namespace (redis-server, web) and two worker hosts (one Celery generation
worker each, the random 38m Qwen2 model, `engine.lease_seconds: 4`) and runs tests/hosts_scenarios.py:
kill -9 of every process of the host running a job (time until the other host takes it over and
finishes it; goal: takeover within lease + 5 s); a silent partition of the busy host (jobs lost, jobs
completed twice as clients see it: `done` events; goal 0 and 0); a silent partition of an idle host right
after 4 jobs were enqueued (jobs lost; goal 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts_scenarios import run_in_namespaces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cut", type=float, default=15.0)
    parser.add_argument("--idle-cut", type=float, default=10.0)
    args = parser.parse_args()
    for i in range(args.rounds):
        found = run_in_namespaces(Path(tempfile.mkdtemp(prefix="hosts-bench-")), args.cut, args.idle_cut)
        kill, busy, idle = (found.get(k, {}) for k in ("host_kill", "busy_partition", "idle_partition"))
        print(f"round {i + 1}:")
        print(
            f"  host kill: takeover {kill.get('takeover_s')} s (lease {kill.get('lease_s')} s), finished "
            f"{kill.get('finish_s')} s after the kill, {kill.get('status')} at attempt {kill.get('attempts')}"
        )
        lost = int(busy.get("status") not in ("succeeded", "failed", "canceled", "timed_out")) + int(
            idle.get("lost", 0)
        )
        twice = max(0, int(busy.get("done_events", 1)) - 1) + sum(max(0, n - 1) for n in idle.get("done_events", []))
        print(
            f"  partitions ({args.cut:g} s busy, {args.idle_cut:g} s idle): jobs lost {lost}, completed twice "
            f"as clients see it {twice}; busy job finished by the other host {busy.get('finish_s')} s into the "
            f"cut, late run refused: {busy.get('late_run_dropped')}; idle-cut jobs all ended "
            f"{idle.get('all_ended_s')} s into the cut (attempts {idle.get('attempts')})"
        )
        print("  raw: " + json.dumps(found))


if __name__ == "__main__":
    main()
