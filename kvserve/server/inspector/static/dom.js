// kvserve KV inspector: small DOM helpers and number formats shared by the page's modules.

export const el = (id) => document.getElementById(id);

export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

export const fmt = {
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

export function shortId(id) {
  const [base, sample] = id.split("#");
  const short = base.length > 14 ? base.slice(0, 5) + "…" + base.slice(-6) : base;
  return sample === undefined ? short : short + "#" + sample;
}
