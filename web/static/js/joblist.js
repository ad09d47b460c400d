// The caller's jobs from GET /v1/jobs (status filter; every type: generations, downloads, exports), the
// queue overview from GET /v1/queues, and the current job's webhook attempts from GET /v1/jobs/{id}/webhooks.
import { api, jobPath } from "./api.js";
import { $, el, statusBadge } from "./ui.js";

/** "position 2 · ~4.5 s" (or "starts now") for a queued job, "" otherwise. */
export function queueText(job) {
  if (job.status !== "queued" || job.queue_position === null || job.queue_position === undefined) return "";
  const eta = job.estimated_start_seconds;
  if (eta === 0) return "starts now";
  return `position ${job.queue_position}` + (eta === null || eta === undefined ? "" : ` · ~${eta} s`);
}

/** Seconds from start to end (to now while running), or null before the start. */
export function runSeconds(job, now = Date.now() / 1000) {
  if (!job.started_at) return null;
  return Math.max(0, (job.completed_at ?? now) - job.started_at);
}

/** "12:03:04" (today) or "Dec 6 12:03" of a Unix time, "" for none. */
export function clock(seconds) {
  if (!seconds) return "";
  const d = new Date(seconds * 1000);
  const today = d.toDateString() === new Date().toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
}

/** A job's row text: the error reason of a job that failed, else its text (generation) or result. */
export function outcome(job) {
  if (job.error) return `${job.error.code}: ${job.error.message}`;
  if (job.type === "generation") return job.output?.text ?? "";
  return job.output ? JSON.stringify(job.output) : "";
}

function tokensPerSecond(job) {
  const tokens = job.output?.usage?.completion_tokens ?? job.progress?.tokens;
  const seconds = runSeconds(job);
  if (job.type !== "generation" || !tokens || !seconds) return "";
  return (tokens / seconds).toFixed(1);
}

export async function loadJobs(onPick) {
  const status = $("jobs-status").value;
  const query = status ? `?limit=20&status=${encodeURIComponent(status)}` : "?limit=20";
  const page = await api("GET", `/v1/jobs${query}`);
  const rows = page.data.map((job) => {
    const text = outcome(job).replace(/\n/g, " ↵ ");
    const seconds = runSeconds(job);
    const queue = [job.queue ?? "—", job.priority && job.priority !== "normal" ? job.priority : "", queueText(job)];
    return el("tr", { dataset: { id: job.id, status: job.status, type: job.type } },
      el("td", {}, el("button", { type: "button", className: "link", textContent: job.id, title: "show this job",
                                  onclick: () => onPick(job) })),
      el("td", { className: "type", textContent: job.type }),
      el("td", {}, statusBadge(job.status)),
      el("td", { className: "position", textContent: queue.filter(Boolean).join(" · ") }),
      el("td", { className: "created", textContent: clock(job.created_at) }),
      el("td", { className: "duration", textContent: seconds === null ? "" : `${seconds.toFixed(2)} s` }),
      el("td", { className: "rate", textContent: tokensPerSecond(job) }),
      el("td", { className: job.error ? "snippet error" : "snippet", title: text,
                 textContent: text.length > 60 ? `${text.slice(0, 60)}…` : text }));
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
