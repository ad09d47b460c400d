// Batches: submit JSONL, watch by id, progress, results, cancel.
import { BATCH_DONE, api, batchPath, tracker } from "./api.js";
import { $, bar, el, showError, statusBadge } from "./ui.js";

export const batches = tracker({ key: "batches", path: batchPath, done: BATCH_DONE, render: renderBatches });

export async function submitBatch() {
  showError(null);
  try {
    batches.remember(await api("POST", "/v1/batches", { body: $("batch-jsonl").value, type: "application/x-ndjson" }));
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

export function renderBatches() {
  const rows = batches.ids().map((id) => {
    const b = batches.seen.get(id) ?? { id, status: "…" };
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
