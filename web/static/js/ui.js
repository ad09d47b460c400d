// Small DOM helpers. Data only ever reaches the DOM through textContent / text nodes, never innerHTML.
import { ApiError } from "./api.js";

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));  // strings become text nodes
  return node;
}

export function showError(err) {
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

export function formatCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} K`;
  return String(n);
}

export function statusBadge(status) {
  return el("span", { className: "status", textContent: status, dataset: { status } });
}

export function bar(value, max, done) {
  const p = el("progress", { max: Math.max(max, 1) });
  p.value = done ? p.max : Math.min(value, p.max);
  return p;
}
