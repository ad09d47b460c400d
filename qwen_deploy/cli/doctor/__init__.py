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
from qwen_deploy.cli.doctor.context import Check, Context, Outcome

FIX_CONFIG = "fix the key named in the config row (config.yml, .env or the environment)"
SKIP_FIX = {"config": FIX_CONFIG, "redis": FIX_REDIS}

# (row name, what the check needs: "config" valid and/or "redis" reachable, check)
CHECKS: list[tuple[str, tuple[str, ...], Callable[[Context], Outcome]]] = [
    ("python", (), check_python),
    ("packages", (), check_packages),
    ("config", (), check_config),
    ("api_keys", ("config",), check_api_keys),
    ("redis", (), check_redis),
    ("redis_persistence", ("redis",), check_persistence),
    ("redis_eviction", ("redis",), check_eviction),
    ("workers", ("config", "redis"), check_workers),
    ("queues", ("config", "redis"), check_queues),
    ("model", ("config",), check_model),
    ("memory", ("config",), check_memory),
    ("disk", (), check_disk),
    ("hf_token", ("config",), check_hf_token),
]


def run_checks() -> list[Check]:
    """Every check in order; one whose needs are unmet, or that crashes, becomes a warn row."""
    ctx, results = Context(), []
    for name, needs, check in CHECKS:
        unmet = {"config": ctx.config[0] is None, "redis": ctx.connection[0] is None}
        missing = [need for need in needs if unmet[need]]
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


def run(as_json: bool = False) -> int:
    """Print the checks (a table, or JSON); 1 when a blocking check failed."""
    results = run_checks()
    ok = not any(c.status == "fail" for c in results)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in results]}, indent=2))
    else:
        print(format_table(results))
    return 0 if ok else 1
