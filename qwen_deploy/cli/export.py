"""`qwen-deploy export`: a training checkpoint exported (in-process, or as a convert-queue job with --queue), merged
into a model directory or, with --keep-lora, as a PEFT adapter; with --serve-as, then served under a new name:
the adapter loaded on its base model (`/v1/load_lora_adapter`), the merged model registered (`/v1/register_model`;
its workers: `qwen-deploy worker --model NAME`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qwen_deploy.cli.common import client, print_progress, settings
from qwen_deploy.cli.job_commands import model_job
from qwen_deploy.client import APIError, Client


def cmd_export(args: argparse.Namespace) -> int:
    api = None
    if args.serve_as and not args.queue:  # the export job checks the name itself
        api = client(args.url)
        try:
            taken = api.served(args.serve_as)
        except APIError as exc:
            sys.exit(f"qwen-deploy: {exc}")
        if taken is not None:
            sys.exit(f"qwen-deploy: the name {args.serve_as!r} is already served; choose another --serve-as")

    def local() -> dict[str, Any]:
        out = Path(args.out).expanduser().resolve()
        root = settings().paths.models_root.expanduser().resolve()
        if api is not None and not out.is_relative_to(root):
            sys.exit(f"qwen-deploy: --serve-as needs --out under paths.models_root ({root})")
        report = _export_here(args, out)
        if api is not None:
            report["served"] = _serve(api, args, out, root)
        return report

    body = {
        "checkpoint": args.checkpoint,
        "base": args.base,
        "out": args.out,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "keep_lora": True if args.keep_lora else None,
        "lora_alpha": args.lora_alpha,
        "serve_as": args.serve_as,
    }
    return model_job(args, "export", body, local)


def _export_here(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from conversion import ConversionError, export_checkpoint

    progress = lambda stage, f: print_progress({"phase": stage, "fraction": f"{f:.2f}"})  # noqa: E731
    checkpoint, base = Path(args.checkpoint).expanduser(), Path(args.base).expanduser()
    if not args.keep_lora:
        return export_checkpoint(
            checkpoint,
            base,
            out,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            progress=progress,
            lora_alpha=args.lora_alpha,
        )
    from qwen_deploy.adapters import AdapterError
    from worker.lora_export import export_kept_lora

    try:
        return export_kept_lora(checkpoint, base, out, args.lora_alpha, progress)
    except AdapterError as exc:
        raise ConversionError(str(exc), "invalid_adapter") from None


def _serve(api: Client, args: argparse.Namespace, out: Path, root: Path) -> dict[str, Any]:
    """The export loaded as an adapter (--keep-lora) or registered as a model, through the API."""
    relative = str(out.relative_to(root))
    try:
        if args.keep_lora:
            return api.load_adapter({"lora_name": args.serve_as, "lora_path": relative})
        served = api.register_model({"model_name": args.serve_as, "model_path": relative})
    except APIError as exc:
        sys.exit(f"qwen-deploy: exported to {out}, but the server did not serve it: {exc}")
    start = f"qwen-deploy worker --model {args.serve_as}"
    print(f"qwen-deploy: registered {args.serve_as!r}; start its workers with: {start}", file=sys.stderr)
    return {**served, "workers": start}


def add_export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `export`."""
    ex = sub.add_parser("export", help="training/RL checkpoint -> validated HF safetensors directory (or adapter)")
    ex.add_argument("checkpoint")
    ex.add_argument("--base", required=True, help="base HF model directory (config, tokenizer, weights)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    ex.add_argument("--max-shard-size", default="2GB")
    ex.add_argument(
        "--keep-lora",
        action="store_true",
        help="write the LoRA unmerged, as a PEFT adapter directory checked against --base (shapes, logits): a PEFT "
        "adapter directory, or a verl FSDP / DeepSpeed / state-dict checkpoint holding lora_A/lora_B tensors",
    )
    ex.add_argument(
        "--lora-alpha",
        type=float,
        metavar="ALPHA",
        help="the LoRA alpha used in training, when the checkpoint's adapter_config.json lacks it (verl writes 0)",
    )
    ex.add_argument(
        "--serve-as",
        metavar="NAME",
        help="once validated, serve the result on the server (--url; with --queue the export job does) as NAME: "
        "with --keep-lora as an adapter of its base model, else as a new model (then start its workers: "
        "qwen-deploy worker --model NAME); --out must be under paths.models_root",
    )
    ex.add_argument(
        "--queue",
        action="store_true",
        help="run it as a job on the convert queue (paths relative to paths.checkpoints_root / paths.models_root)",
    )
    ex.add_argument("--url")
    ex.set_defaults(func=cmd_export)
