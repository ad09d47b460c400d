"""EleutherAI lm-evaluation-harness against a running stack: `local-completions` (token-id prompts, several per
request, `echo` + `logprobs`, `max_tokens` 1) on a small local multiple-choice task, compared with the harness's
own in-process `hf` model on the same weights (fp32 both sides). Nothing comes from the hub: the task YAML and its
JSONL data are written here (Zen of Python lines: pick the right ending among four), the model is the demo model.

    uv run --with "lm-eval[api,hf]" python bench/lm_eval_bench.py [--model demo|random] [--batch-size 4] [--limit N]

lm-eval is not one of the project's dependencies; `--with` installs it next to them for this run only. Prints the
accuracies of both, how many of the per-choice loglikelihoods agree (to 1e-4) and their largest difference, how
many greedy flags agree, and the wall time of each run (task loading included). Exits non-zero when the accuracies differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the task's data and the tokenizer are local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_overhead import System  # noqa: E402

TASK = "zen_choice"
CHOICES = 4


def task_files(folder: Path, seed: int = 0) -> Path:
    """A multiple-choice task over the Zen of Python: the first words of a line, and four endings (its own and
    three taken from other lines); written as a task YAML and its JSONL data."""
    from worker.builders.demo import zen_text

    lines = [line.strip() for line in zen_text().splitlines() if len(line.split()) >= 4]
    rng = random.Random(seed)
    docs = []
    for i, line in enumerate(lines):
        words = line.split()
        cut = max(2, len(words) // 2)
        head, tail = " ".join(words[:cut]), " " + " ".join(words[cut:])
        others = [" " + " ".join(o.split()[max(2, len(o.split()) // 2) :]) for j, o in enumerate(lines) if j != i]
        wrong = rng.sample(sorted(set(others) - {tail}), CHOICES - 1)
        choices = [*wrong, tail]
        rng.shuffle(choices)
        docs.append({"question": head, "choices": choices, "answer": choices.index(tail)})
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{question}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"',
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "  - metric: acc_norm",
                "    aggregation: mean",
                "    higher_is_better: true",
                "",
            ]
        )
    )
    return folder


def evaluate(model: str, model_args: dict[str, Any], tasks: Path, batch_size: int, limit: int | None) -> Any:
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        limit=limit,
        log_samples=True,
    )
    return out, time.perf_counter() - started


def scores(out: dict[str, Any]) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc id, choice) → (loglikelihood, is_greedy) of every request the harness made."""
    found = {}
    for sample in out["samples"][TASK]:
        for choice, resp in enumerate(sample["resps"]):
            ll, greedy = resp[0]
            found[(sample["doc_id"], choice)] = (float(ll), bool(greedy))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="requests per completions call (prompts per job)")
    parser.add_argument("--limit", type=int, default=None, help="documents to evaluate (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model",
        choices=("demo", "random"),
        default="demo",
        help="demo: the demo model (it knows the Zen: accuracy near 1); random: a tiny random Qwen2 on the demo "
        "tokenizer (accuracy near chance: a harder test of agreement)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import requests
    import torch

    from worker.demo_model import build_demo_model

    torch.set_num_threads(args.threads)
    demo = build_demo_model(log=lambda msg: None)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = task_files(Path(tmp))
        weights = demo
        if args.model == "random":
            from worker.random_model import build_random_model

            weights = build_random_model("qwen2", "tiny", Path(tmp) / "random", tokenizer_dir=demo)
        system = System(Path(tmp), weights, threads=args.threads, dtype="fp32")
        try:
            served = requests.get(system.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            api_args = {
                "model": served,
                "base_url": system.url + "/v1/completions",
                "tokenizer": str(weights),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
            }
            api, api_seconds = evaluate("local-completions", api_args, tasks, args.batch_size, args.limit)
        finally:
            system.stop()
        hf_args = {"pretrained": str(weights), "dtype": "float32", "device": "cpu"}
        local, hf_seconds = evaluate("hf", hf_args, tasks, args.batch_size, args.limit)

    a, b = scores(api), scores(local)
    assert a.keys() == b.keys(), "the two runs scored different requests"
    diffs = [abs(a[k][0] - b[k][0]) for k in a]
    report = {
        "task": TASK,
        "model": args.model,
        "documents": len(api["samples"][TASK]),
        "requests": len(a),
        "batch_size": args.batch_size,
        "local_completions": {m: api["results"][TASK][f"{m},none"] for m in ("acc", "acc_norm")},
        "hf": {m: local["results"][TASK][f"{m},none"] for m in ("acc", "acc_norm")},
        "loglikelihoods_within_1e-4": sum(d <= 1e-4 for d in diffs),
        "max_abs_loglikelihood_diff": max(diffs),
        "greedy_flags_equal": sum(a[k][1] == b[k][1] for k in a),
        "seconds_with_task_setup": {"local_completions": round(api_seconds, 1), "hf": round(hf_seconds, 1)},
    }
    print(json.dumps(report, indent=2))
    if report["local_completions"] != report["hf"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
