"""Using the service from Python with the client class the CLI uses (qwen_deploy.client.Client).

uv run qwen-deploy up --demo                 # in another terminal
uv run python examples/client.py [--url http://127.0.0.1:8000] [--api-key KEY]
"""

from __future__ import annotations

import argparse

from qwen_deploy.client import APIError, Client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    client = Client(args.url, api_key=args.api_key)

    print("model:", client.model()["name"])

    # Submit, then wait (long-poll) for the result.
    job = client.submit("Beautiful is better than", max_new_tokens=8)
    done = client.wait(job["id"])
    print("wait:", repr(done["output"]["text"]), done["output"]["finish_reason"])

    # Chat messages go through the model's chat template; stream the tokens as they come.
    job = client.submit(messages=[{"role": "user", "content": "Errors should never"}], max_new_tokens=16)
    for kind, data in client.stream(job["id"]):
        if kind == "token":
            print("token:", repr(data["text"]))
        elif kind == "done":
            print("stream:", data["status"], repr(data["output"]["text"]))

    # Cancel a long job: it stops within a second and keeps its partial text.
    job = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True)
    client.cancel(job["id"])
    print("cancel:", client.wait(job["id"])["status"])

    # A batch: many prompts, batched generation, results while it runs.
    lines = [
        {"custom_id": f"line-{i}", "body": {"prompt": p, "max_new_tokens": 6}}
        for i, p in enumerate(["Beautiful is better than", "Errors should never", "Now is better than"])
    ]
    batch = client.create_batch(lines)
    results: list[dict] = []
    while len(results) < len(lines):
        results += client.batch_results(batch["id"], after=len(results))
    for line in sorted(results, key=lambda r: r["custom_id"]):
        print("batch:", line["custom_id"], repr(line["response"]["body"]["output"]["text"]))

    # Errors are APIError with the status, code and param of the error body.
    try:
        client.submit("too long", max_new_tokens=513)
    except APIError as exc:
        print("error:", exc.status, exc.code, exc.param)


if __name__ == "__main__":
    main()
