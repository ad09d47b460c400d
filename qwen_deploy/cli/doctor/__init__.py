"""Pre-deployment checks (`qwen-deploy doctor`): each says pass, warn or fail, and how to fix it.

The checks are small functions in the ``CHECKS`` registry; a ``fail`` is blocking (exit code 1), a
``warn`` is not. Torch is imported lazily, by the memory check only. Secrets are never printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from qwen_deploy.cli.doctor.checks_model import check_hf_token, check_memory, check_model
from qwen_deploy.cli.doctor.checks_redis import (
    FIX_REDIS,
    check_eviction,
    check_persistence,
    check_queues,
    check_redis,
    check_workers,
)
from qwen_deploy.cli.doctor.checks_system import (
    check_api_keys,
    check_config,
    check_disk,
    check_packages,
    check_python,
)
from qwen_deploy.cli.doctor.checks_web import FIX_WEB, check_up, check_web, check_web_queues, check_web_workers
from qwen_deploy.cli.doctor.context import Check, Context, Outcome

FIX_CONFIG = "fix the key named in the config row (config.yml, .env or the environment)"
SKIP_FIX = {"config": FIX_CONFIG, "redis": FIX_REDIS, "web": FIX_WEB}
Row = tuple[str, tuple[str, ...], Callable[[Context], Outcome]]

# (row name, what the check needs: "config" valid, "redis" reachable, "web" answering, check); a row that
# needs the web tier is left out when none is known (no `--url`, no `up` running here).
CHECKS: list[Row] = [
    ("python", (), check_python),
    ("packages", (), check_packages),
    ("config", (), check_config),
    ("api_keys", ("config",), check_api_keys),
    ("up", (), check_up),
    ("redis", (), check_redis),
    ("web", ("web",), check_web),
    ("redis_persistence", ("redis",), check_persistence),
    ("redis_eviction", ("redis",), check_eviction),
    ("workers", ("config", "redis"), check_workers),
    ("queues", ("config", "redis"), check_queues),
    ("model", ("config",), check_model),
    ("memory", ("config",), check_memory),
    ("disk", (), check_disk),
    ("hf_token", ("config",), check_hf_token),
]


# `doctor --url`: the web tier is asked, not Redis (which may be out of reach from here).
WEB_CHECKS: list[Row] = [
    ("python", (), check_python),
    ("packages", (), check_packages),
    ("web", (), check_web),
    ("workers", ("web",), check_web_workers),
    ("queues", ("web",), check_web_queues),
]


def run_checks(url: str | None = None) -> list[Check]:
    """Every check in order (of the web tier at `url` when given); one whose needs are unmet, or that
    crashes, becomes a warn row."""
    ctx = Context(url)
    results: list[Check] = []
    for name, needs, check in WEB_CHECKS if url else CHECKS:
        if "web" in needs and not ctx.web_url:
            continue
        unmet = {
            "config": lambda: ctx.config[0] is None,
            "redis": lambda: ctx.connection[0] is None,
            "web": lambda: any(r.name == "web" and r.status == "fail" for r in results),
        }
        missing = [need for need in needs if unmet[need]()]
        if missing:
            outcome: Outcome = "warn", f"skipped: {' and '.join(missing)} unavailable", SKIP_FIX[missing[0]]
        else:
            try:
                outcome = check(ctx)
            except Exception as exc:  # one broken check must not hide the others
                outcome = "warn", f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"
        results.append(Check(name, *outcome))
    return results


def format_table(results: list[Check]) -> str:
    """The checks as an aligned table, each non-passing row followed by its fix, then the counts."""
    width = max(len(c.name) for c in results) + 2
    lines = [f"{'check':<{width}}{'status':<8}detail"]
    for c in results:
        lines.append(f"{c.name:<{width}}{c.status:<8}{c.detail}")
        if c.status != "pass" and c.fix:
            lines.append(f"{'':<{width + 8}}fix: {c.fix}")
    counts = {s: sum(c.status == s for c in results) for s in ("pass", "warn", "fail")}
    return "\n".join([*lines, ", ".join(f"{n} {s}" for s, n in counts.items())])


def run(as_json: bool = False, url: str | None = None) -> int:
    """Print the checks (a table, or JSON) of this host's system, or of the web tier at `url`; 1 when a
    blocking check failed."""
    results = run_checks(url)
    ok = not any(c.status == "fail" for c in results)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in results]}, indent=2))
    else:
        print(format_table(results))
    return 0 if ok else 1
