"""The `qwen-deploy` command: the application shell, the one part of `qwen_deploy` that may import
the worker, conversion and analysis packages (lazily, inside the commands that need them)."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from qwen_deploy.cli import errors, healthcheck, job_commands, jobs, serve
from qwen_deploy.cli.errors import normalize_url


def cmd_doctor(args: argparse.Namespace) -> int:
    from qwen_deploy.cli import doctor

    return doctor.run(as_json=args.json, url=normalize_url(args.url) if args.url else None)


def _version() -> str:
    try:
        return version("qwen-deploy")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="qwen-deploy", description="A job queue for LLM work.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parsers(sub)
    jobs.add_parsers(sub)
    job_commands.add_parsers(sub)
    doc = sub.add_parser("doctor", help="pre-deployment checks; non-zero exit when a blocking check fails")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.add_argument(
        "--url",
        help="ask the web tier at this address (http://host:port) instead of checking this host; without it, "
        "doctor checks the system a running `qwen-deploy up` started here, else the configured Redis",
    )
    doc.set_defaults(func=cmd_doctor)
    healthcheck.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; its exit code."""
    args = build_parser().parse_args(argv)
    return errors.run(lambda: int(args.func(args) or 0))
