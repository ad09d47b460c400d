// qwen-deploy job console: plain ES2020, no framework, no build step.
// Data only ever reaches the DOM through textContent / text nodes, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "canceled", "timed_out"]);
const GONE = new Set([...TERMINAL, "expired", "not_found"]);  // stop polling these
const BATCH_DONE = new Set(["completed", "failed", "cancelled", "expired", "not_found"]);
const POLL_MS = 2000;
const MODEL_POLL_MS = 5000;
const MAX_RECENT = 20;

// -- session storage (the key, the ids this page submitted) ------------------------------------
const saved = {
  get(name, fallback) {
    try { return JSON.parse(sessionStorage.getItem(`qd.${name}`)) ?? fallback; } catch { return fallback; }
  },
  set(name, value) { sessionStorage.setItem(`qd.${name}`, JSON.stringify(value)); },
};

// -- the API ----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.param = error.param ?? null;
  }
}

function authHeaders(extra = {}) {
  const key = saved.get("apiKey", "");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(res) {
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return new ApiError(res.status, body?.error ?? { message: text.slice(0, 200) || res.statusText });
}

/** fetch + JSON; throws ApiError with the API's {code, message, param} on a non-2xx answer. */
async function api(method, path, { json, body, type, raw = false } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json" }) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
    init.headers["Content-Type"] = type;
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await errorOf(res);
  return raw ? res.text() : res.json();
}

const goneStatus = (err) => (err.status === 410 ? "expired" : "not_found");
const jobPath = (id) => `/v1/jobs/${encodeURIComponent(id)}`;
const batchPath = (id) => `/v1/batches/${encodeURIComponent(id)}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- small DOM helpers ------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));  // strings become text nodes
  return node;
}

function showError(err) {
  const box = $("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const e = err instanceof ApiError ? err : { status: 0, code: "network_error", message: String(err.message || err) };
  let text = `${e.status ? `${e.status} ` : ""}${e.code}: ${e.message}`;
  if (e.param) text += ` (param: ${e.param})`;
  if (e.status === 401) text += " — enter an API key at the top right";
  box.textContent = text;
  box.dataset.code = e.code;
  box.hidden = false;
}

function formatCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} K`;
  return String(n);
}

function statusBadge(status) {
  return el("span", { className: "status", textContent: status, dataset: { status } });
}

function bar(value, max, done) {
  const p = el("progress", { max: Math.max(max, 1) });
  p.value = done ? p.max : Math.min(value, p.max);
  return p;
}

// -- the served model and readiness -----------------------------------------------------------
async function loadModel() {
  const ready = $("ready");
  try {
    const m = await api("GET", "/v1/model");
    $("model-name").textContent = m.name;
    $("model-device").textContent = m.device ?? "";
    $("model-dtype").textContent = m.dtype ?? "";
    $("model-params").textContent = m.parameters ? `${formatCount(m.parameters)} parameters` : "";
    if (m.caps?.max_new_tokens) $("max-new-tokens").max = m.caps.max_new_tokens;
    ready.textContent = `ready · ${m.workers} worker${m.workers === 1 ? "" : "s"}`;
    ready.dataset.ready = "yes";
  } catch (err) {
    ready.textContent = `not ready: ${err instanceof ApiError ? err.code : "unreachable"}`;
    ready.dataset.ready = "no";
    if (err.status === 401) showError(err);
  }
}

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
  return body;
}

function describe(job) {
  const parts = [];
  const out = job.output;
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
}

/** Make `job` the current job and stream its events (from the start) into the output box. */
function follow(job) {
  current?.controller.abort();
  current = { id: job.id, max: job.progress?.max_new_tokens ?? 0, controller: new AbortController() };
  $("job-id").textContent = job.id;
  $("output").textContent = "";
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
    recent.set(d.id, d);
    renderRecent();
    return true;
  }
  return false;
}

/** Parse a text/event-stream body into {event, id, data} objects. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = { event: "message", id: null, data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;  // a comment or keep-alive
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "event") ev.event = val;
          else if (field === "id") ev.id = val;
          else if (field === "data") ev.data.push(val);
        }
        if (ev.data.length) yield { event: ev.event, id: ev.id, data: JSON.parse(ev.data.join("\n")) };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
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

/** Forget the job on screen (its stream stops; the job itself keeps running). */
function clearCurrent(label) {
  current?.controller.abort();
  current = null;
  $("job-id").textContent = "—";
  $("output").textContent = "";
  $("progress-text").textContent = "";
  $("progress").value = 0;
  setStatus(label);
}

async function submitJob(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  clearCurrent("submitting");
  try {
    const job = await api("POST", "/v1/jobs", { json: jobBody() });
    remember(job);
    follow(job);
  } catch (err) {
    setStatus("—");
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

async function cancelJob() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    const job = await api("POST", `${jobPath(current.id)}/cancel`);
    if (current?.id === job.id && !TERMINAL.has($("status").dataset.status)) setStatus(job.status);
  } catch (err) {
    showError(err);
  }
}

// -- recent jobs ------------------------------------------------------------------------------
const recent = new Map();  // id → last job object seen

function remember(job) {
  const ids = [job.id, ...saved.get("jobs", []).filter((x) => x !== job.id)].slice(0, MAX_RECENT);
  saved.set("jobs", ids);
  recent.set(job.id, job);
  renderRecent();
}

async function pollJobs() {
  const ids = saved.get("jobs", []).filter((id) => !GONE.has(recent.get(id)?.status));
  await Promise.all(ids.map(async (id) => {
    try {
      recent.set(id, await api("GET", jobPath(id)));
    } catch (err) {
      if (err.status === 404 || err.status === 410) recent.set(id, { id, status: goneStatus(err) });
    }
  }));
  if (ids.length) renderRecent();
}

function renderRecent() {
  const rows = saved.get("jobs", []).map((id) => {
    const job = recent.get(id) ?? { id, status: "…" };
    const p = job.progress ?? {};
    const text = job.output?.text ?? "";
    const line = text.replace(/\n/g, " ↵ ");
    return el("tr", { dataset: { id, status: job.status } },
      el("td", {}, el("button", { type: "button", className: "link", textContent: id, title: "show this job",
                                  onclick: () => follow(job) })),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, bar(p.tokens ?? 0, p.max_new_tokens ?? 0, job.status === "succeeded"),
         ` ${p.tokens ?? 0}/${p.max_new_tokens ?? 0}`),
      el("td", { className: "snippet", title: text, textContent: line.length > 80 ? `${line.slice(0, 80)}…` : line }));
  });
  $("recent").replaceChildren(...rows);
}

// -- batches ----------------------------------------------------------------------------------
const batches = new Map();  // id → last batch object seen

function rememberBatch(batch) {
  const ids = [batch.id, ...saved.get("batches", []).filter((x) => x !== batch.id)].slice(0, MAX_RECENT);
  saved.set("batches", ids);
  batches.set(batch.id, batch);
  renderBatches();
}

async function submitBatch() {
  showError(null);
  try {
    rememberBatch(await api("POST", "/v1/batches", { body: $("batch-jsonl").value, type: "application/x-ndjson" }));
  } catch (err) {
    showError(err);
  }
}

async function watchBatch() {
  const id = $("batch-id").value.trim();
  if (!id) return;
  showError(null);
  try {
    rememberBatch(await api("GET", batchPath(id)));
    $("batch-id").value = "";
  } catch (err) {
    showError(err);
  }
}

async function pollBatches() {
  const ids = saved.get("batches", []).filter((id) => !BATCH_DONE.has(batches.get(id)?.status));
  await Promise.all(ids.map(async (id) => {
    try {
      batches.set(id, await api("GET", batchPath(id)));
    } catch (err) {
      if (err.status === 404 || err.status === 410) batches.set(id, { id, status: goneStatus(err) });
    }
  }));
  if (ids.length) renderBatches();
}

async function showResults(id) {
  const box = $("batch-results");
  try {
    const lines = (await api("GET", `${batchPath(id)}/results`, { raw: true })).split("\n").filter(Boolean);
    const rows = lines.map((line) => {
      const r = JSON.parse(line);
      const text = r.response?.body?.output?.text ?? "";
      const outcome = r.error ? `error ${r.error.code}: ${r.error.message}` : JSON.stringify(text);
      return `${r.custom_id}\t${outcome}`;
    });
    box.textContent = `results of ${id} (${lines.length} so far)\n${rows.join("\n")}`;
    box.hidden = false;
  } catch (err) {
    showError(err);
  }
}

async function cancelBatch(id) {
  try {
    batches.set(id, await api("POST", `${batchPath(id)}/cancel`));
    renderBatches();
  } catch (err) {
    showError(err);
  }
}

function renderBatches() {
  const rows = saved.get("batches", []).map((id) => {
    const b = batches.get(id) ?? { id, status: "…" };
    const c = b.request_counts ?? { total: 0, completed: 0, failed: 0 };
    const running = !BATCH_DONE.has(b.status) && b.status !== "cancelling";
    return el("tr", { dataset: { id, status: b.status } },
      el("td", {}, el("code", { textContent: id })),
      el("td", {}, statusBadge(b.status)),
      el("td", {}, bar(c.completed + c.failed, c.total, false)),
      el("td", { className: "counts", textContent: `${c.completed} ok · ${c.failed} failed / ${c.total}` }),
      el("td", {},
        el("button", { type: "button", className: "small", textContent: "results", onclick: () => showResults(id) }),
        running ? el("button", { type: "button", className: "small", textContent: "cancel",
                                 onclick: () => cancelBatch(id) }) : null));
  });
  $("batch-list").replaceChildren(...rows);
}

// -- wiring -----------------------------------------------------------------------------------
function setKey() {
  saved.set("apiKey", $("api-key").value.trim());
  showError(null);
  for (const [id, job] of recent) if (!GONE.has(job.status)) recent.delete(id);
  loadModel();
  pollJobs();
  pollBatches();
}

function promptMode() {
  $("prompt-label").textContent = $("chat").checked ? "Message (sent as {role: user})" : "Prompt";
}

let polling = false;
async function tick() {
  if (polling) return;
  polling = true;
  try {
    await Promise.all([pollJobs(), pollBatches()]);
  } finally {
    polling = false;
  }
}

function init() {
  $("api-key").value = saved.get("apiKey", "");
  $("api-key").addEventListener("change", setKey);
  $("key-form").addEventListener("submit", (event) => { event.preventDefault(); setKey(); });
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("chat").addEventListener("change", promptMode);
  $("clear-recent").addEventListener("click", () => { saved.set("jobs", []); recent.clear(); renderRecent(); });
  $("submit-batch").addEventListener("click", submitBatch);
  $("watch-batch").addEventListener("click", watchBatch);
  $("error").addEventListener("click", () => showError(null));
  promptMode();
  renderRecent();
  renderBatches();
  loadModel();
  tick();
  setInterval(tick, POLL_MS);
  setInterval(loadModel, MODEL_POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
