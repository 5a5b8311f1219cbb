// kvserve KV inspector: polls /kv/state (one request in flight) and draws the pool, the
// requests, the series and the cost. No build step, no library: plain DOM and SVG.
"use strict";

const POLL_MS = 300;
const MAX_ROWS = 300;
const el = (id) => document.getElementById(id);
let state = null;
let selected = null;      // request id whose blocks are outlined
let pinned = null;        // block id whose details stay shown
let hovered = null;
let cells = [];           // one div per block
let cellClass = [];       // the class each cell has now (only changed cells are touched)
let owners = new Map();   // block id -> [request id, index in its table]

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = {
  int: (v) => v == null ? "–" : Math.round(v).toLocaleString("en-US"),
  pct: (v) => v == null ? "–" : (100 * v).toFixed(1) + "%",
  ms: (v) => v == null ? "–" : (1000 * v).toFixed(v < 0.1 ? 1 : 0) + " ms",
  rate: (v) => v == null ? "–" : v.toFixed(v < 10 ? 1 : 0),
  bytes: (v) => {
    if (v == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(v < 10 ? 2 : 1) : v) + " " + units[i];
  },
};

function shortId(id) {
  const [base, sample] = id.split("#");
  const short = base.length > 14 ? base.slice(0, 5) + "…" + base.slice(-6) : base;
  return sample === undefined ? short : short + "#" + sample;
}

// ---- the block grid ------------------------------------------------------------------

function buildGrid(n) {
  const grid = el("grid");
  grid.replaceChildren();
  cells = [];
  cellClass = [];
  for (let i = 0; i < n; i++) {
    const cell = h("div", { class: "blk", "data-block-id": i });
    cells.push(cell);
    cellClass.push("blk");
    grid.append(cell);
  }
}

function drawGrid(s) {
  const pool = s.pool;
  if (cells.length !== pool.num_blocks) buildGrid(pool.num_blocks);
  const mine = new Set();
  const request = s.requests.find((r) => r.id === selected);
  if (request) for (const b of request.block_ids) if (b !== 0) mine.add(b);
  for (let i = 0; i < pool.num_blocks; i++) {
    let cls = "blk " + pool.states[i];
    if (mine.has(i)) cls += " sel";
    if (i === pinned) cls += " pinned";
    if (cellClass[i] !== cls) { cells[i].className = cls; cellClass[i] = cls; }
  }
  for (const name of ["free", "cached", "used", "shared"]) {
    document.querySelector(`[data-count="${name}"]`).textContent = fmt.int(pool["num_" + name]);
  }
  el("pool-title").textContent =
    `${fmt.int(pool.num_blocks)} blocks × ${pool.block_size} tokens, ` +
    `${fmt.int(pool.num_evictions)} evictions`;
}

// ---- one block -----------------------------------------------------------------------

function showBlock(id, details) {
  const box = el("block");
  if (id == null || !state || id >= state.pool.num_blocks) { box.textContent = "hover a block"; return; }
  const pool = state.pool;
  const own = owners.get(id) || [];
  const rows = [
    ["id", id],
    ["state", pool.states[id]],
    ["ref count", pool.ref_counts[id]],
    ["hash", details && details.hash ? details.hash : (pool.hashes[id] || "none (not full)")],
    ["owners", own.length ? own.map(([r, i]) => `${shortId(r)} [${i}]`).join(", ") : "none"],
  ];
  const dl = h("dl");
  for (const [k, v] of rows) dl.append(h("dt", {}, k), h("dd", {}, v));
  box.replaceChildren(dl);
  if (details && details.text != null) {
    box.append(h("pre", { id: "block-text" }, details.text));
  } else if (details && !state.show_text) {
    box.append(h("p", { class: "hint" }, "text hidden (start the server with --kv-inspector-show-text)"));
  } else if (id === pinned) {
    box.append(h("p", { class: "hint" }, details ? "no tokens known" : "loading…"));
  }
}

async function pinBlock(id) {
  pinned = pinned === id ? null : id;
  el("block-pin").textContent = pinned == null ? "" : `(pinned: ${pinned})`;
  if (state) drawGrid(state);
  if (pinned == null) { showBlock(hovered, null); return; }
  showBlock(id, null);
  try {
    const reply = await fetch(`/kv/blocks/${id}`, { cache: "no-store" });
    if (reply.ok && pinned === id) showBlock(id, await reply.json());
  } catch (e) { /* the next poll reports a lost server */ }
}

// ---- requests ------------------------------------------------------------------------

function drawRequests(s) {
  const body = document.querySelector("#requests tbody");
  const rows = [];
  for (const r of s.requests.slice(0, MAX_ROWS)) {
    const tr = h("tr", { "data-request-id": r.id },
      h("td", { title: r.id }, shortId(r.id)),
      h("td", { class: "status-" + r.status }, r.status),
      h("td", {}, fmt.int(r.num_prompt_tokens)),
      h("td", {}, fmt.int(r.num_cached_tokens)),
      h("td", {}, fmt.int(r.num_computed_tokens)),
      h("td", {}, `${fmt.int(r.num_output_tokens)}/${fmt.int(r.max_tokens)}`),
      h("td", {}, r.num_preemptions),
      h("td", {}, r.block_ids.filter((b) => b !== 0).length));
    if (r.id === selected) tr.classList.add("selected");
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const running = s.requests.filter((r) => r.status === "running").length;
  const gone = selected && !s.requests.some((r) => r.id === selected) ? `; ${shortId(selected)} finished` : "";
  el("request-count").textContent = `${running} running, ${s.requests.length - running} waiting${gone}`;
}

// ---- charts (plain SVG) --------------------------------------------------------------

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#3f7cbf", "#e8912d", "#1f7a3a", "#d6246e"];

function svg(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function chart(figure, title, points, lines, format, fixedMax) {
  const W = 300, H = 110, L = 4, R = 4, T = 14, B = 4;
  const values = points.flatMap((p) => lines.map((l) => l.get(p))).filter((v) => v != null);
  const max = fixedMax || Math.max(1e-9, ...values) * 1.1;
  const t0 = points.length ? points[0].t : 0;
  const span = points.length > 1 ? points[points.length - 1].t - t0 : 1;
  const x = (t) => L + (W - L - R) * (t - t0) / span;
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  root.append(svg("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#ccc" }));
  const top = svg("text", { x: L + 2, y: 10 });
  top.textContent = "max " + format(max);
  root.append(top);
  const caption = h("figcaption", {}, title + " ");
  lines.forEach((line, i) => {
    let d = "";
    for (const p of points) {
      const v = line.get(p);
      if (v == null) continue;
      d += (d ? "L" : "M") + x(p.t).toFixed(1) + "," + y(v).toFixed(1);
    }
    root.append(svg("path", { d, fill: "none", stroke: COLORS[i], "stroke-width": 1.5,
      "vector-effect": "non-scaling-stroke" }));
    const last = points.length ? line.get(points[points.length - 1]) : null;
    const key = h("span", { style: `color:${COLORS[i]}` }, `■ ${line.label} `);
    caption.append(key, h("b", {}, format(last)), " ");
  });
  figure.replaceChildren(caption, root);
}

function drawCharts(points) {
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

// ---- cost and tiers ------------------------------------------------------------------

function drawCost(c) {
  const per = c.bytes_per_token;
  const element = per - c.scale_bytes_per_token;
  const bytesPerElement = element / (2 * c.num_layers * c.num_kv_heads * c.head_dim);
  const scales = c.scale_bytes_per_token ? ` + ${fmt.int(c.scale_bytes_per_token)} B of scales` : "";
  const formula = h("div", { class: "formula" },
    `2 (K, V) × ${c.num_layers} layers × ${c.num_kv_heads} KV heads × ${c.head_dim} dims × ` +
    `${bytesPerElement} B (${c.kv_dtype})${scales} = ${fmt.int(per)} B per token`);
  const facts = h("p", {},
    `A block of ${fmt.int(c.bytes_per_block / per)} tokens: ${fmt.bytes(c.bytes_per_block)}. ` +
    `The pool: ${fmt.bytes(c.pool_bytes)}, ${fmt.int(c.tokens_fit)} tokens ` +
    `(${(c.tokens_fit / c.max_model_len).toFixed(1)} requests of max_model_len ${fmt.int(c.max_model_len)}). ` +
    `Cache mode: ${c.cache_mode}${c.sliding_window ? `, sliding window ${c.sliding_window}` : ""}.`);
  const bars = [
    ["contiguous, max_model_len each", c.contiguous_max_len_bytes],
    ["contiguous, prompt + max_tokens", c.contiguous_exact_bytes],
    ["paged, no sharing", c.paged_unshared_bytes],
    ["paged (what the pool holds)", c.paged_bytes],
  ];
  const top = Math.max(1, ...bars.map((b) => b[1]));
  const chartBox = h("div", {}, h("p", {},
    `For the ${c.num_requests_holding} requests holding blocks ` +
    `(${fmt.int(c.tokens_held)} tokens computed):`));
  for (const [label, value] of bars) {
    const bar = h("div", { class: "bar" }, h("i", { style: `width:${(100 * value / top).toFixed(1)}%` }));
    chartBox.append(h("div", { class: "bar-row" }, h("span", {}, label), bar, h("span", { class: "val" }, fmt.bytes(value))));
  }
  el("cost").replaceChildren(h("div", { class: "cost-grid" }, h("div", {}, formula, facts), chartBox));
}

function drawTiers(s) {
  const names = Object.keys(s.tiers);
  if (!names.length) return;
  const table = h("table", {}, h("thead", {}, h("tr", {},
    ...["tier", "holds", "hit rate", "hits (up)", "misses", "written (down)", "evictions", "errors"]
      .map((t) => h("th", {}, t)))));
  const body = h("tbody");
  for (const name of names) {
    const t = s.tiers[name];
    const holds = t.capacity_bytes
      ? `${fmt.int(t.blocks_held)} blocks, ${fmt.bytes(t.bytes_held)} of ${fmt.bytes(t.capacity_bytes)}`
      : "not counted (its own maxmemory)";
    body.append(h("tr", {}, h("td", {}, name), h("td", {}, holds), h("td", {}, fmt.pct(t.hit_rate)), h("td", {}, fmt.int(t.hits)),
      h("td", {}, fmt.int(t.misses)), h("td", {}, fmt.int(t.blocks_written)), h("td", {}, fmt.int(t.evictions)),
      h("td", {}, fmt.int(t.errors))));
  }
  table.append(body);
  el("tiers").replaceChildren(table);
  const lines = [];
  for (const name of names) {
    lines.push({ label: `${name} up`, get: (p) => p.tiers[name] ? p.tiers[name].hits : null });
    lines.push({ label: `${name} down`, get: (p) => p.tiers[name] ? p.tiers[name].written : null });
  }
  chart(el("chart-tiers"), "Blocks moving per 0.5 s", s.series, lines.slice(0, 4), fmt.int);
}

// ---- the loop ------------------------------------------------------------------------

function render(s) {
  state = s;
  owners = new Map();
  for (const r of s.requests) {
    r.block_ids.forEach((b, i) => {
      if (b === 0) return;
      if (!owners.has(b)) owners.set(b, []);
      owners.get(b).push([r.id, i]);
    });
  }
  drawGrid(s);
  drawRequests(s);
  drawCharts(s.series);
  drawCost(s.cost);
  drawTiers(s);
  if (pinned == null) showBlock(hovered, null);
  const usage = s.pool.num_blocks > 1 ? (s.pool.num_used + s.pool.num_shared) / (s.pool.num_blocks - 1) : 0;
  el("status").textContent = `step ${fmt.int(s.step)} · KV ${fmt.pct(usage)} used · ` +
    `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
}

function showError(message) {
  const box = el("error");
  box.textContent = message;
  box.hidden = !message;
}

async function poll() {
  try {
    const reply = await fetch("/kv/state", { cache: "no-store" });
    if (reply.ok) {
      render(await reply.json());
      showError("");
    } else {
      const body = await reply.json().catch(() => null);
      showError(`GET /kv/state: ${reply.status} ${body && body.error ? body.error.message : ""}`);
    }
  } catch (e) {
    showError("the server does not answer; retrying");
  }
  setTimeout(poll, POLL_MS);
}

el("grid").addEventListener("mouseover", (e) => {
  const id = e.target.dataset ? e.target.dataset.blockId : undefined;
  if (id === undefined) return;
  hovered = Number(id);
  if (pinned == null) showBlock(hovered, null);
});
el("grid").addEventListener("click", (e) => {
  const id = e.target.dataset ? e.target.dataset.blockId : undefined;
  if (id !== undefined) pinBlock(Number(id));
});
document.querySelector("#requests tbody").addEventListener("click", (e) => {
  const row = e.target.closest("tr");
  if (!row) return;
  const id = row.dataset.requestId;
  selected = selected === id ? null : id;
  if (state) { drawGrid(state); drawRequests(state); }
});
poll();
