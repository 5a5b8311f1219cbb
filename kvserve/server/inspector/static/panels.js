// kvserve KV inspector: the "what does this cost" panel and the tiers table and chart.

import { chart } from "./charts.js";
import { el, fmt, h } from "./dom.js";

export function drawCost(c) {
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

export function drawTiers(s) {
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
