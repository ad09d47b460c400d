"""The reliability figures: runs the chaos and hard-limit tests (real redis-server, real prefork workers, the demo
model) and prints what each recorded (jobs, terminal, lost, duplicates, recoveries) beside its outcome and time.

    uv run python bench/reliability_bench.py [-k NAME]

The tests assert the promises (every job terminal, nothing lost, the right texts); the figures they record
through pytest's `record_property` (JUnit XML) are printed here rather than by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/e2e/test_chaos.py", "tests/e2e/test_hard_limit.py"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default=None, help="only the tests matching this pytest expression")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "0",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *TESTS,
        ]
        if args.k:
            cmd += ["-k", args.k]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not report.exists():
            raise SystemExit(f"pytest wrote no report:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        cases = ET.parse(report).getroot().iter("testcase")
        print(f"$ uv run python bench/reliability_bench.py{' -k ' + args.k if args.k else ''}")
        for case in cases:
            outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
            if case.find("skipped") is not None:
                outcome = "skipped"
            figures = {
                p.get("name", "").removeprefix("reliability:"): json.loads(p.get("value") or "{}")
                for p in case.iter("property")
                if p.get("name", "").startswith("reliability:")
            }
            shown = "; ".join(
                f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in figures.items()
            )
            print(f"{case.get('name')}: {outcome} in {float(case.get('time') or 0):.1f} s  {shown}")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
