// The caller's jobs from GET /v1/jobs (status filter), the queue overview from GET /v1/queues, and the
// current job's webhook attempts from GET /v1/jobs/{id}/webhooks.
import { api, jobPath } from "./api.js";
import { $, el, statusBadge } from "./ui.js";

/** "position 2 · ~4.5 s" (or "starts now") for a queued job, "" otherwise. */
export function queueText(job) {
  if (job.status !== "queued" || job.queue_position === null || job.queue_position === undefined) return "";
  const eta = job.estimated_start_seconds;
  if (eta === 0) return "starts now";
  return `position ${job.queue_position}` + (eta === null || eta === undefined ? "" : ` · ~${eta} s`);
}

export async function loadJobs(onPick) {
  const status = $("jobs-status").value;
  const query = status ? `?limit=20&status=${encodeURIComponent(status)}` : "?limit=20";
  const page = await api("GET", `/v1/jobs${query}`);
  const rows = page.data.map((job) => {
    const text = (job.output?.text ?? "").replace(/\n/g, " ↵ ");
    return el("tr", { dataset: { id: job.id, status: job.status } },
      el("td", {}, el("button", { type: "button", className: "link", textContent: job.id, title: "show this job",
                                  onclick: () => onPick(job) })),
      el("td", {}, statusBadge(job.status)),
      el("td", { className: "priority", textContent: job.priority ?? "normal" }),
      el("td", { className: "position", textContent: queueText(job) }),
      el("td", { className: "snippet", title: text, textContent: text.length > 60 ? `${text.slice(0, 60)}…` : text }));
  });
  $("job-list").replaceChildren(...rows);
  $("jobs-more").hidden = !page.has_more;
}

export async function loadQueues() {
  const q = await api("GET", "/v1/queues");
  const parts = q.data.map((item) => `${item.name} ${item.depth}`);
  $("queues").textContent = `queued: ${parts.join(" · ")} · ${q.workers} worker${q.workers === 1 ? "" : "s"}`;
  $("queues").dataset.interactive = String(q.data.find((item) => item.name === "interactive")?.depth ?? 0);
}

export async function loadWebhooks(id) {
  const list = await api("GET", `${jobPath(id)}/webhooks`);
  const rows = list.data.map((a) => el("li", { dataset: { event: a.event } },
    `${new Date(a.time * 1000).toLocaleTimeString()} ${a.event} #${a.attempt}: `,
    a.status_code ? `HTTP ${a.status_code}` : (a.error ?? "no answer"), ` · ${a.duration_ms} ms`));
  $("webhooks").replaceChildren(...rows);
  $("webhooks-box").hidden = rows.length === 0;
}
