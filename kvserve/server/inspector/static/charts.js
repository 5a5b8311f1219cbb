// kvserve KV inspector: the time-series charts, plain SVG built once per figure and then
// updated in place (a path's points, the max label, the latest values).

import { el, fmt, h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#3f7cbf", "#e8912d", "#1f7a3a", "#d6246e"];

function svg(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export function chart(figure, title, points, lines, format, fixedMax) {
  const W = 300, H = 110, L = 4, R = 4, T = 14, B = 4;
  const names = lines.map((l) => l.label).join("|");
  if (figure.dataset.lines !== names) {  // first drawing, or other lines: build it
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
    root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#ccc" }), svg("text", { x: L + 2, y: 10 }));
    const caption = h("figcaption", {}, title + " ");
    lines.forEach((line, i) => {
      root.append(svg("path", { fill: "none", stroke: COLORS[i], "stroke-width": 1.5,
        "vector-effect": "non-scaling-stroke" }));
      caption.append(h("span", { style: `color:${COLORS[i]}` }, `■ ${line.label} `), h("b"), " ");
    });
    figure.replaceChildren(caption, root);
    figure.dataset.lines = names;
  }
  const values = points.flatMap((p) => lines.map((l) => l.get(p))).filter((v) => v != null);
  const max = fixedMax || Math.max(1e-9, ...values) * 1.1;
  const t0 = points.length ? points[0].t : 0;
  const span = points.length > 1 ? points[points.length - 1].t - t0 : 1;
  const x = (t) => L + (W - L - R) * (t - t0) / span;
  const y = (v) => T + (H - T - B) * (1 - v / max);
  figure.querySelector("text").textContent = "max " + format(max);
  const paths = figure.querySelectorAll("path");
  const lastValues = figure.querySelectorAll("figcaption b");
  lines.forEach((line, i) => {
    const d = [];
    for (const p of points) {
      const v = line.get(p);
      if (v != null) d.push((d.length ? "L" : "M") + x(p.t).toFixed(1) + "," + y(v).toFixed(1));
    }
    paths[i].setAttribute("d", d.join(""));
    lastValues[i].textContent = format(points.length ? line.get(points[points.length - 1]) : null);
  });
}

export function drawCharts(points) {
  chart(el("chart-usage"), "KV usage", points, [{ label: "blocks held", get: (p) => p.kv_usage }], fmt.pct, 1);
  chart(el("chart-hit"), "Prefix-cache hit rate", points, [{ label: "tokens", get: (p) => p.hit_rate }], fmt.pct, 1);
  chart(el("chart-reqs"), "Requests", points, [
    { label: "running", get: (p) => p.running }, { label: "waiting", get: (p) => p.waiting }], fmt.int);
  chart(el("chart-toks"), "Tokens / s", points, [
    { label: "generated", get: (p) => p.generation_tok_s }, { label: "prompt", get: (p) => p.prompt_tok_s }], fmt.rate);
  chart(el("chart-ttft"), "Time to first token (10 s window)", points, [
    { label: "p50", get: (p) => p.ttft_p50 }, { label: "p99", get: (p) => p.ttft_p99 }], fmt.ms);
  chart(el("chart-itl"), "Inter-token latency (10 s window)", points, [
    { label: "p50", get: (p) => p.itl_p50 }, { label: "p99", get: (p) => p.itl_p99 }], fmt.ms);
}
