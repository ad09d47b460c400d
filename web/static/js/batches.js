// Batches: the caller's batches (GET /v1/batches: those made through the API too), submit JSONL, watch one
// by id (kept when it is past the listing's newest 20), progress, results, cancel.
import { BATCH_DONE, api, batchPath, tracker } from "./api.js";
import { clock } from "./joblist.js";
import { $, bar, el, showError, statusBadge } from "./ui.js";

export const batches = tracker({ key: "batches", path: batchPath, done: BATCH_DONE, render: renderBatches });
let listed = [];  // ids of GET /v1/batches, newest first

export async function loadBatches() {
  const page = await api("GET", "/v1/batches?limit=20");
  listed = page.data.map((b) => b.id);
  for (const b of page.data) batches.seen.set(b.id, b);
  await batches.poll();  // the watched ones that are not listed
  renderBatches();
}

export async function submitBatch() {
  showError(null);
  try {
    const batch = await api("POST", "/v1/batches", { body: $("batch-jsonl").value, type: "application/x-ndjson" });
    batches.seen.set(batch.id, batch);
    listed = [batch.id, ...listed.filter((id) => id !== batch.id)];
    renderBatches();
  } catch (err) {
    showError(err);
  }
}

export async function watchBatch() {
  const id = $("batch-id").value.trim();
  if (!id) return;
  showError(null);
  try {
    batches.remember(await api("GET", batchPath(id)));
    $("batch-id").value = "";
  } catch (err) {
    showError(err);
  }
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
    batches.update(await api("POST", `${batchPath(id)}/cancel`));
  } catch (err) {
    showError(err);
  }
}

let drawn = "";  // what the table shows: redrawn only when it changes (a click must not land on a removed row)

export function renderBatches() {
  const ids = [...listed, ...batches.ids().filter((id) => !listed.includes(id))];
  const shown = JSON.stringify(ids.map((id) => [id, batches.seen.get(id)?.status, batches.seen.get(id)?.request_counts]));
  if (shown === drawn) return;
  drawn = shown;
  const rows = ids.map((id) => {
    const b = batches.seen.get(id) ?? { id, status: "…" };
    const c = b.request_counts ?? { total: 0, completed: 0, failed: 0 };
    const running = !BATCH_DONE.has(b.status) && b.status !== "cancelling";
    return el("tr", { dataset: { id, status: b.status } },
      el("td", {}, el("code", { textContent: id })),
      el("td", {}, statusBadge(b.status)),
      el("td", { className: "created", textContent: clock(b.created_at) }),
      el("td", {}, bar(c.completed + c.failed, c.total, false)),
      el("td", { className: "counts", textContent: `${c.completed} ok · ${c.failed} failed / ${c.total}` }),
      el("td", {},
        el("button", { type: "button", className: "small", textContent: "results", onclick: () => showResults(id) }),
        running ? el("button", { type: "button", className: "small", textContent: "cancel",
                                 onclick: () => cancelBatch(id) }) : null));
  });
  $("batch-list").replaceChildren(...rows);
}
