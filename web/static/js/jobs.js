// The current job: submit, stream its events, cancel (the job table is joblist.js).
import { ApiError, GONE, TERMINAL, api, authHeaders, errorOf, jobPath, sleep, sseEvents } from "./api.js";
import { loadJobs, loadWebhooks, queueText } from "./joblist.js";
import { $, showError } from "./ui.js";

const refreshList = () => loadJobs(follow).catch(() => {});

// -- the current job: submit, stream, cancel --------------------------------------------------
let current = null;  // {id, max, controller}

/** "a|b\n" → ["a", "b\n"]: `|` separates, `\n` `\t` `\|` `\\` are escapes. */
function splitStops(text) {
  const out = [];
  let piece = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length) {
      const next = text[++i];
      piece += next === "n" ? "\n" : next === "t" ? "\t" : next;
    } else if (c === "|") {
      out.push(piece);
      piece = "";
    } else {
      piece += c;
    }
  }
  out.push(piece);
  return out.filter((s) => s !== "");
}

function jobBody() {
  const text = $("prompt").value;
  const body = $("chat").checked ? { messages: [{ role: "user", content: text }] } : { prompt: text };
  const n = $("max-new-tokens").value.trim();
  if (n !== "") body.max_new_tokens = Number(n);
  const t = $("temperature").value.trim();
  if (t !== "") body.temperature = Number(t);
  const stop = splitStops($("stop").value);
  if (stop.length) body.stop = stop;
  if ($("ignore-eos").checked) body.ignore_eos = true;
  if ($("priority").value !== "normal") body.priority = $("priority").value;
  const deadline = $("deadline").value.trim();
  if (deadline !== "") body.deadline_seconds = Number(deadline);
  return body;
}

function describe(job) {
  const parts = [];
  const out = job.output;
  if (queueText(job)) parts.push(queueText(job));
  if (out?.finish_reason) parts.push(out.finish_reason);
  if (job.error) parts.push(`${job.error.code}: ${job.error.message}`);
  if (job.attempts > 1) parts.push(`attempt ${job.attempts}`);
  if (job.started_at && job.completed_at) parts.push(`${(job.completed_at - job.started_at).toFixed(2)} s`);
  return parts.join(" · ");
}

function setStatus(status, detail = "") {
  $("status").textContent = status;
  $("status").dataset.status = status;
  $("status-detail").textContent = detail;
  $("cancel").disabled = !current || GONE.has(status) || status === "canceling";
}

function setProgress(tokens, max, done = false) {
  const p = $("progress");
  p.max = Math.max(max, 1);
  p.value = done ? p.max : Math.min(tokens, p.max);
  $("progress-text").textContent = `${tokens} / ${max} tokens`;
}

function showJob(job) {
  setStatus(job.status, describe(job));
  setProgress(job.progress?.tokens ?? 0, job.progress?.max_new_tokens ?? 0, job.status === "succeeded");
  if (job.output && TERMINAL.has(job.status)) $("output").textContent = job.output.text ?? "";
  if (TERMINAL.has(job.status)) loadWebhooks(job.id).catch(() => {});
}

/** While the current job is queued, refresh its position (the stream only says when it starts). */
export async function refreshQueued() {
  if (!current || $("status").dataset.status !== "queued") return;
  const job = await api("GET", jobPath(current.id));
  if (current?.id === job.id && job.status === "queued") setStatus("queued", describe(job));
}

/** Make `job` the current job and stream its events (from the start) into the output box. */
export function follow(job) {
  current?.controller.abort();
  current = { id: job.id, max: job.progress?.max_new_tokens ?? 0, controller: new AbortController() };
  $("job-id").textContent = job.id;
  $("output").textContent = "";
  $("webhooks-box").hidden = true;
  showJob(job);
  if (TERMINAL.has(job.status)) return;  // nothing more will happen: no stream needed
  const { signal } = current.controller;
  stream(job.id, signal).catch((err) => { if (!signal.aborted) showError(err); });
}

function onEvent(id, ev) {
  if (current?.id !== id) return true;
  const out = $("output");
  const d = ev.data;
  if (ev.event === "status") {
    if (d.attempt > 1) {  // the worker was lost and the job restarted: its text starts over
      out.textContent = "";
      setProgress(0, current.max);
    }
    setStatus(d.status, d.attempt > 1 ? `attempt ${d.attempt}` : "");
  } else if (ev.event === "token") {
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    out.append(d.text);
    if (atBottom) out.scrollTop = out.scrollHeight;
    if ($("status").dataset.status === "queued") setStatus("running");
    setProgress(d.tokens, current.max);
  } else if (ev.event === "done") {
    showJob(d);
    refreshList();
    return true;
  }
  return false;
}

/** fetch() the SSE stream (EventSource cannot send Authorization); resume with Last-Event-ID. */
async function stream(id, signal) {
  let last = null;
  let failures = 0;
  while (!signal.aborted) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (last) headers["Last-Event-ID"] = last;
    try {
      const res = await fetch(`${jobPath(id)}/events`, { headers, signal });
      if (!res.ok) throw await errorOf(res);
      for await (const ev of sseEvents(res.body)) {
        failures = 0;
        if (ev.id) last = ev.id;
        if (onEvent(id, ev)) return;
      }
    } catch (err) {
      if (signal.aborted || err instanceof ApiError) throw err;
    }
    if (++failures > 5) throw new Error("the event stream keeps closing; the job list below still updates");
    await sleep(500 * failures);
  }
}

/** Submit the form's job and follow it; a rejected submit (4xx) leaves the job on screen as it was. */
export async function submitJob(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", { json: jobBody() });
    follow(job);
    refreshList();
  } catch (err) {
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

export async function cancelJob() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    const job = await api("POST", `${jobPath(current.id)}/cancel`);
    if (current?.id === job.id && !TERMINAL.has($("status").dataset.status)) setStatus(job.status);
  } catch (err) {
    showError(err);
  }
}
