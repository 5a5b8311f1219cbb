// kvserve KV inspector: polls /kv/state (one request in flight) and draws the pool, the
// requests, the series and the cost. No build step, no library: plain DOM and SVG, as ES
// modules (dom.js, charts.js, panels.js).
// Cheap on purpose (the browser may share the engine's cores): the series comes in pieces
// (?since=), a panel is redrawn only when its data changed, charts at most once a second.

import { drawCharts } from "./charts.js";
import { el, fmt, h, shortId } from "./dom.js";
import { drawCost, drawTiers } from "./panels.js";

const POLL_MS = 400;
const MAX_ROWS = 300;
const MAX_POINTS = 600;   // as many as the server keeps (5 minutes)
const CHART_MS = 1000;    // charts are redrawn at most once a second
let state = null;
let selected = null;      // request id whose blocks are outlined
let pinned = null;        // block id whose details stay shown
let hovered = null;
let cells = [];           // one div per block
let cellClass = [];       // the class each cell has now (only changed cells are touched)
let owners = new Map();   // block id -> [request id, index in its table]
let series = [];          // the points so far; each poll asks for the newer ones
let seriesOrigin = null;  // the server's series start: another one means a new server
const drawn = {};         // panel -> the JSON it was last drawn from
let chartsDrawn = 0;      // performance.now() of the last chart drawing
let chartsDirty = false;  // points came since
let paused = false;       // the pause button: no polls, so the server stops copying

function changed(panel, data) {
  const text = JSON.stringify(data);
  if (drawn[panel] === text) return false;
  drawn[panel] = text;
  return true;
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

const COLUMNS = [
  (r) => shortId(r.id),
  (r) => r.status,
  (r) => fmt.int(r.num_prompt_tokens),
  (r) => fmt.int(r.num_cached_tokens),
  (r) => fmt.int(r.num_computed_tokens),
  (r) => `${fmt.int(r.num_output_tokens)}/${fmt.int(r.max_tokens)}`,
  (r) => String(r.num_preemptions),
  (r) => String(r.block_ids.filter((b) => b !== 0).length),
];
let rowsById = new Map();  // request id -> its <tr>, kept while the request lives

function requestRow(r) {
  let tr = rowsById.get(r.id);
  if (!tr) {
    tr = h("tr", { "data-request-id": r.id }, ...COLUMNS.map(() => h("td")));
    tr.cells[0].title = r.id;
  }
  COLUMNS.forEach((column, i) => {
    const text = column(r);
    if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text;
  });
  tr.cells[1].className = "status-" + r.status;
  tr.classList.toggle("selected", r.id === selected);
  return tr;
}

function drawRequests(s) {
  const body = document.querySelector("#requests tbody");
  const shown = s.requests.slice(0, MAX_ROWS);
  const next = new Map(shown.map((r) => [r.id, requestRow(r)]));
  rowsById = next;
  const rows = [...next.values()];
  const same = rows.length === body.rows.length && rows.every((tr, i) => body.rows[i] === tr);
  if (!same) body.replaceChildren(...rows);  // order or membership changed
  const running = s.requests.filter((r) => r.status === "running").length;
  const gone = selected && !s.requests.some((r) => r.id === selected) ? `; ${shortId(selected)} finished` : "";
  el("request-count").textContent = `${running} running, ${s.requests.length - running} waiting${gone}`;
}
// ---- the loop ------------------------------------------------------------------------

function addSeries(s) {
  if (s.series_origin !== seriesOrigin) { series = []; seriesOrigin = s.series_origin; }
  const last = series.length ? series[series.length - 1].t : -Infinity;
  const fresh = s.series.filter((p) => p.t > last);
  series = series.concat(fresh).slice(-MAX_POINTS);
  s.series = series;
  return fresh.length > 0;
}

function render(s) {
  const newPoints = addSeries(s);
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
  if (changed("requests", [s.requests, selected])) drawRequests(s);
  chartsDirty = chartsDirty || newPoints;
  const chartsNow = chartsDirty && performance.now() - chartsDrawn >= CHART_MS;
  if (chartsNow) {
    drawCharts(s.series);
    chartsDrawn = performance.now();
    chartsDirty = false;
  }
  if (changed("cost", s.cost)) drawCost(s.cost);
  if (changed("tiers", s.tiers) || chartsNow) drawTiers(s);
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

let timer = null;
let inFlight = false;

function schedule() {
  clearTimeout(timer);
  timer = null;
  if (!paused && !document.hidden && !inFlight) timer = setTimeout(poll, POLL_MS);
}

function pollNow() {
  clearTimeout(timer);
  timer = null;
  if (!paused && !document.hidden && !inFlight) poll();
}

async function poll() {
  timer = null;
  inFlight = true;
  try {
    await fetchState();  // a drawing error is not caught here: it reaches the console
  } finally {
    inFlight = false;
    schedule();
  }
}

async function fetchState() {
  const since = series.length ? `?since=${series[series.length - 1].t}` : "";
  let reply, body;
  try {
    reply = await fetch("/kv/state" + since, { cache: "no-store" });
    body = await reply.json();
  } catch (e) {
    showError(reply ? `GET /kv/state: ${reply.status}` : "the server does not answer; retrying");
    return;
  }
  if (!reply.ok) {
    showError(`GET /kv/state: ${reply.status} ${body && body.error ? body.error.message : ""}`);
    return;
  }
  showError("");
  render(body);
}

// a paused page or a hidden tab polls nothing, so the server stops copying the cache
el("pause").addEventListener("click", () => {
  paused = !paused;
  el("pause").textContent = paused ? "resume" : "pause";
  el("pause").setAttribute("aria-pressed", String(paused));
  pollNow();
});
document.addEventListener("visibilitychange", pollNow);

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
