// The last 15 minutes of activity from GET /v1/stats, drawn as small SVG line charts (no library, works
// offline): tokens/s, jobs finished per minute, queue depth per queue, p50 queue wait and run time.
import { api } from "./api.js";
import { $, el } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 70;
const WINDOW_S = 15 * 60;

const CHARTS = [
  { id: "chart-tokens", title: "tokens / s", lines: [["tokens", (p) => p.tokens_per_second]] },
  { id: "chart-jobs", title: "jobs finished / min", lines: [["jobs", (p) => p.jobs_per_minute]] },
  { id: "chart-depth", title: "queue depth",
    lines: [["interactive", (p) => p.depth.interactive ?? 0], ["bulk", (p) => p.depth.bulk ?? 0]] },
  { id: "chart-latency", title: "p50 seconds",
    lines: [["queue wait", (p) => p.queue_seconds_p50], ["run", (p) => p.run_seconds_p50]] },
];

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/** One chart: a polyline per series over the last 15 minutes, scaled to the largest value shown. */
function draw(chart, points, now) {
  const box = $(chart.id);
  const values = chart.lines.map(([, get]) => points.map((p) => [p.t, get(p)]).filter(([, v]) => v !== null));
  const top = Math.max(1e-9, ...values.flat().map(([, v]) => v));
  const plot = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img" });
  plot.append(svg("line", { x1: 0, y1: HEIGHT - 0.5, x2: WIDTH, y2: HEIGHT - 0.5, class: "axis" }));
  values.forEach((series, i) => {
    const coords = series.map(([t, v]) => {
      const x = WIDTH * (1 - (now - t) / WINDOW_S);
      const y = HEIGHT - 2 - (HEIGHT - 6) * (v / top);
      return `${Math.max(0, x).toFixed(1)},${y.toFixed(1)}`;
    });
    if (coords.length) plot.append(svg("polyline", { points: coords.join(" "), class: `series s${i}` }));
    if (coords.length) {  // the latest value as a dot (a lone first point is visible too)
      const [x, y] = coords[coords.length - 1].split(",");
      plot.append(svg("circle", { cx: Math.min(Number(x), WIDTH - 3), cy: y, r: 2.5, class: `dot s${i}` }));
    }
  });
  const legend = chart.lines.map(([name], i) => {
    const last = values[i].length ? values[i][values[i].length - 1][1] : null;
    return el("span", { className: `legend s${i}`, textContent: `${name} ${fmt(last)}` });
  });
  box.replaceChildren(
    el("div", { className: "chart-head" }, el("strong", { textContent: chart.title }),
       el("span", { className: "meta", textContent: `max ${fmt(values.flat().length ? top : null)}` })),
    plot,
    el("div", { className: "chart-legend" }, ...legend));
  box.dataset.points = String(values.reduce((n, s) => n + s.length, 0));
}

export async function loadCharts() {
  const stats = await api("GET", "/v1/stats");
  const points = stats.data;
  const now = Date.now() / 1000;
  for (const chart of CHARTS) draw(chart, points, now);
  const note = $("charts-note");
  note.textContent = points.length
    ? `last 15 minutes · a point every ${stats.interval} s`
    : `no samples yet: workers report every ${stats.interval} s`;
}
