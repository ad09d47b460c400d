// qwen-deploy job console: the served model and readiness, the API key, polling, and the wiring.
import { ApiError, api, saved } from "./api.js";
import { loadBatches, renderBatches, submitBatch, watchBatch } from "./batches.js";
import { loadCharts } from "./charts.js";
import { loadJobs, loadQueues } from "./joblist.js";
import { cancelJob, follow, refreshQueued, submitJob } from "./jobs.js";
import { $, formatCount, showError } from "./ui.js";

const POLL_MS = 2000;
const MODEL_POLL_MS = 5000;
const CHART_POLL_MS = 5000;

async function loadModel() {
  const ready = $("ready");
  try {
    const m = await api("GET", "/v1/model");
    const listed = await api("GET", "/v1/models").catch(() => null);
    // The served model's id (as /v1/models and the SDKs name it), never its filesystem path.
    $("model-name").textContent = listed?.data?.[0]?.id ?? m.name.split("/").pop();
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

function setKey() {
  saved.set("apiKey", $("api-key").value.trim());
  showError(null);
  loadModel();
  tick();
}

function promptMode() {
  $("prompt-label").textContent = $("chat").checked ? "Message (sent as {role: user})" : "Prompt";
}

let polling = false;
async function tick() {
  if (polling) return;
  polling = true;
  try {
    const quiet = (p) => p.catch(() => {});  // a 401 is shown by loadModel
    await Promise.all([quiet(loadBatches()), quiet(loadJobs(follow)), quiet(loadQueues()), quiet(refreshQueued())]);
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
  $("submit-batch").addEventListener("click", submitBatch);
  $("watch-batch").addEventListener("click", watchBatch);
  $("error").addEventListener("click", () => showError(null));
  $("jobs-status").addEventListener("change", () => loadJobs(follow).catch(showError));
  promptMode();
  renderBatches();
  loadModel();
  tick();
  setInterval(tick, POLL_MS);
  setInterval(loadModel, MODEL_POLL_MS);
  const charts = () => loadCharts().catch(() => {});  // a 401 is shown by loadModel
  charts();
  setInterval(charts, CHART_POLL_MS);
}

// Module scripts run deferred, after parsing: the DOM is there.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
