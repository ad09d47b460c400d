#!/usr/bin/env bash
# Every route of the API with curl. Start the service first: uv run qwen-deploy up --demo
#   examples/curl.sh [BASE_URL]      (API_KEY=... in the environment when keys are configured)
set -euo pipefail
BASE=${1:-http://127.0.0.1:8000}
AUTH=()
[ -n "${API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $API_KEY")
JSON=(-H 'Content-Type: application/json')
c() { curl -sS --fail-with-body "${AUTH[@]}" "$@"; echo; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }

echo "# liveness, readiness, the served model"
c "$BASE/livez"
c "$BASE/readyz"
c "$BASE/v1/model"

echo "# submit a job, then long-poll it"
JOB=$(c "${JSON[@]}" -d '{"prompt": "Beautiful is better than", "max_new_tokens": 8}' "$BASE/v1/jobs" | field id)
c "$BASE/v1/jobs/$JOB?wait=10"

echo "# chat messages, streamed as server-sent events"
JOB=$(c "${JSON[@]}" -d '{"messages": [{"role": "user", "content": "Errors should never"}]}' "$BASE/v1/jobs" | field id)
curl -sS -N "${AUTH[@]}" "$BASE/v1/jobs/$JOB/events"

echo "# synchronous generation"
c "${JSON[@]}" -d '{"prompt": "Errors should never", "max_new_tokens": 6}' "$BASE/v1/generate"

echo "# cancel a long job"
JOB=$(c "${JSON[@]}" -d '{"prompt": "Beautiful is better than", "max_new_tokens": 512, "ignore_eos": true}' "$BASE/v1/jobs" | field id)
c -X POST "$BASE/v1/jobs/$JOB/cancel"
c "$BASE/v1/jobs/$JOB?wait=10"

echo "# retry it: a new job with the same request (retry_of); a high-priority job with a deadline"
RETRY=$(c -X POST "$BASE/v1/jobs/$JOB/retry" | field id)
c -X POST "$BASE/v1/jobs/$RETRY/cancel"
c "${JSON[@]}" -H 'Cancel-After: 30s' -d '{"prompt": "Errors should never", "max_new_tokens": 6, "priority": "high"}' \
  "$BASE/v1/jobs"
echo "# queue depths and workers; purge the queued interactive jobs (admin key)"
c "$BASE/v1/queues"
c "$BASE/v1/stats"   # the last 15 minutes of activity (the console's charts)
c -X POST "$BASE/v1/queues/interactive/purge"

MODEL=$(c "$BASE/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
echo "# the OpenAI-compatible routes: models, chat and text completions, responses"
c "$BASE/v1/models/$MODEL"
c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Beautiful is better than\"}]}" \
  "$BASE/v1/chat/completions"
c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"max_tokens\": 6, \"prompt\": \"Errors should never\"}" "$BASE/v1/completions"
RESP=$(c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"max_output_tokens\": 8, \"input\": \"Simple is\", \"background\": true}" \
  "$BASE/v1/responses" | field id)
c "$BASE/v1/responses/$RESP"
c -X POST "$BASE/v1/responses/$RESP/cancel"   # a finished response is returned as it is

echo "# files: upload a batch input file (OpenAI Batch JSONL), read it back, delete it"
FILE=$(printf '%s\n' "{\"custom_id\": \"f\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Flat is\"}], \"max_tokens\": 6}}" \
  | c -F purpose=batch -F "file=@-;filename=input.jsonl" "$BASE/v1/files" | field id)
c "$BASE/v1/files"
c "$BASE/v1/files/$FILE"
c "$BASE/v1/files/$FILE/content"
c -X DELETE "$BASE/v1/files/$FILE"

echo "# Anthropic's Messages API (the key may also go in x-api-key)"
MSG="{\"model\": \"$MODEL\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Beautiful is better than\"}]}"
c "${JSON[@]}" -d "$MSG" "$BASE/v1/messages"
c "${JSON[@]}" -d "$MSG" "$BASE/v1/messages/count_tokens"

echo "# a batch in the OpenAI Batch JSONL format"
BATCH=$(printf '%s\n' \
  '{"custom_id": "a", "method": "POST", "url": "/v1/jobs", "body": {"prompt": "Beautiful is better than", "max_new_tokens": 6}}' \
  '{"custom_id": "b", "method": "POST", "url": "/v1/jobs", "body": {"prompt": "Errors should never", "max_new_tokens": 6}}' \
  | c -H 'Content-Type: application/x-ndjson' --data-binary @- "$BASE/v1/batches" | field id)
for _ in $(seq 50); do
  [ "$(c "$BASE/v1/batches/$BATCH" | field status)" = completed ] && break
  sleep 0.2
done
c "$BASE/v1/batches/$BATCH"
c "$BASE/v1/batches/$BATCH/results?after=0"
BATCH2=$(c "${JSON[@]}" -d '{"requests": [{"custom_id": "x", "body": {"prompt": "Now is better than", "max_new_tokens": 300, "ignore_eos": true}}]}' "$BASE/v1/batches" | field id)
curl -sS "${AUTH[@]}" -X POST "$BASE/v1/batches/$BATCH2/cancel"; echo

echo "# downloads and exports run on the convert queue (paths are relative to the configured roots)"
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"repo_id": "Qwen/Qwen2.5-0.5B-Instruct"}' "$BASE/v1/models/downloads"; echo
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"checkpoint": "../outside", "base": "b", "out": "o"}' "$BASE/v1/models/exports"; echo

echo "# LoRA adapters at runtime (admin key; paths relative to paths.models_root): a missing one is a 422 saying why"
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"lora_name": "mine", "lora_path": "no-such-adapter"}' "$BASE/v1/load_lora_adapter"; echo
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"lora_name": "mine"}' "$BASE/v1/unload_lora_adapter"; echo

echo "# models registered at runtime (admin key; served once 'qwen-deploy worker --model ID' runs): not a model is a 422"
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"model_name": "mine", "model_path": "no-such-model"}' "$BASE/v1/register_model"; echo
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"model_name": "mine"}' "$BASE/v1/unregister_model"; echo

echo "# token utilities (vLLM's shapes; also /v1/tokenize, /v1/detokenize)"
IDS=$(c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"prompt\": \"Beautiful is better than\"}" "$BASE/tokenize")
echo "$IDS"
c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"tokens\": $(python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])' <<<"$IDS")}" "$BASE/detokenize"
c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"prompt\": \"Errors should never\"}" "$BASE/v1/tokenize"
c "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"tokens\": [1, 2]}" "$BASE/v1/detokenize"

echo "# embeddings: for a model served with task: embed (the demo model generates: 400 wrong_model_task)"
curl -sS "${AUTH[@]}" "${JSON[@]}" -d "{\"model\": \"$MODEL\", \"input\": [\"Beautiful is\", \"Errors should\"]}" "$BASE/v1/embeddings"; echo

echo "# errors: always {\"error\": {type, code, message, param}}"
curl -sS "${AUTH[@]}" "${JSON[@]}" -d '{"prompt": "x", "max_new_tokens": 513}' "$BASE/v1/jobs"; echo

echo "# the OpenAPI document and metrics"
DOC=$(c "$BASE/openapi.json"); echo "${DOC:0:200}"
METRICS=$(c "$BASE/metrics"); grep '^qwen_deploy_jobs_total' <<<"$METRICS" || true
