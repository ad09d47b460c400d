// The API as the console uses it: session storage, fetch + JSON errors, the SSE parser, id trackers.
// Plain ES2020 modules, no framework, no build step.

export const TERMINAL = new Set(["succeeded", "failed", "canceled", "timed_out"]);
export const GONE = new Set([...TERMINAL, "expired", "not_found"]);  // stop polling these
export const BATCH_DONE = new Set(["completed", "failed", "cancelled", "expired", "not_found"]);
const MAX_RECENT = 20;

// -- session storage (the key, the ids this page submitted) ------------------------------------
export const saved = {
  get(name, fallback) {
    try { return JSON.parse(sessionStorage.getItem(`qd.${name}`)) ?? fallback; } catch { return fallback; }
  },
  set(name, value) { sessionStorage.setItem(`qd.${name}`, JSON.stringify(value)); },
};

// -- HTTP -------------------------------------------------------------------------------------
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.param = error.param ?? null;
  }
}

export function authHeaders(extra = {}) {
  const key = saved.get("apiKey", "");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function errorOf(res) {
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return new ApiError(res.status, body?.error ?? { message: text.slice(0, 200) || res.statusText });
}

/** fetch + JSON; throws ApiError with the API's {code, message, param} on a non-2xx answer. */
export async function api(method, path, { json, body, type, raw = false } = {}) {
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

export const goneStatus = (err) => (err.status === 410 ? "expired" : "not_found");
export const jobPath = (id) => `/v1/jobs/${encodeURIComponent(id)}`;
export const batchPath = (id) => `/v1/batches/${encodeURIComponent(id)}`;
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Parse a text/event-stream body into {event, id, data} objects. */
export async function* sseEvents(body) {
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

/**
 * The ids this page submitted or watches (newest first, kept in session storage under `key`) and the
 * last object seen for each; `poll()` refreshes those whose status is not in `done`, then `render()`.
 */
export function tracker({ key, path, done, render }) {
  const seen = new Map();  // id → last object seen
  return {
    seen,
    ids: () => saved.get(key, []),
    remember(item) {
      saved.set(key, [item.id, ...saved.get(key, []).filter((x) => x !== item.id)].slice(0, MAX_RECENT));
      seen.set(item.id, item);
      render();
    },
    update(item) {
      seen.set(item.id, item);
      render();
    },
    async poll() {
      const ids = saved.get(key, []).filter((id) => !done.has(seen.get(id)?.status));
      await Promise.all(ids.map(async (id) => {
        try {
          seen.set(id, await api("GET", path(id)));
        } catch (err) {
          if (err.status === 404 || err.status === 410) seen.set(id, { id, status: goneStatus(err) });
        }
      }));
      if (ids.length) render();
    },
    clear() {
      saved.set(key, []);
      seen.clear();
      render();
    },
  };
}
