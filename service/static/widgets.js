// DOM helpers and the dashboard's widgets: hit cards, probability bars, the histogram, the image input.
// Everything from the API is inserted as text (never as HTML); images only from data: URLs.

export function h(tag, props = {}, ...children) {
  const el = tag === "svg" || SVG_TAGS.has(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "style") Object.assign(el.style, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG_TAGS = new Set(["g", "rect", "line", "text", "title", "path"]);

export const clear = (el) => {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
};

// Scores: 4 significant digits, plain notation in the usual range.
export function fmtScore(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3);
  return x.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

export const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

export function safeImageUrl(value) {
  return typeof value === "string" && /^data:image\/(png|jpeg|gif|webp|svg\+xml);base64,/.test(value) ? value : null;
}

// -- display fields ---------------------------------------------------------------------------

const SHOWN_ELSEWHERE = new Set(["image", "title", "snippet", "text", "flipped", "original_label", "row"]);

export function displayExtras(display) {
  return Object.entries(display || {})
    .filter(([k, v]) => !SHOWN_ELSEWHERE.has(k) && ["string", "number", "boolean"].includes(typeof v))
    .filter(([, v]) => typeof v !== "string" || v.length <= 60);
}

// Whether display fields hold something to look at (a thumbnail, a title or a text snippet).
export function hasVisual(display) {
  return Boolean(safeImageUrl(display?.image) || display?.title || display?.snippet || display?.text);
}

// A thumbnail (image tasks), a title + snippet (text tasks) or, for tabular tasks (neither), the display
// fields as a compact table, for one example's display fields.
export function exampleVisual(display, { size = "md", lines = 3, drop = () => false } = {}) {
  const image = safeImageUrl(display?.image);
  if (image) return h("img", { class: `thumb thumb-${size}`, src: image, alt: "", loading: "lazy", decoding: "async" });
  const title = display?.title;
  const snippet = display?.snippet ?? display?.text;
  if (title || snippet) {
    return h("div", { class: `snippet lines-${lines}` },
      title ? h("div", { class: "snippet-title", text: title }) : null,
      snippet ? h("div", { class: "snippet-body", text: snippet }) : null);
  }
  const columns = fieldColumns([display], "display").filter((c) => !drop(c.label, c.get(display)));
  if (columns.length) return fieldsTable(columns, [{ fields: display }], { compact: true });
  return h("div", { class: `thumb thumb-${size} thumb-none`, text: "no preview" });
}

// -- fields as a table (tabular tasks) --------------------------------------------------------------

const MAX_ARRAY_COLUMNS = 64;

// Numbers with at most 4 significant digits after the point (1065, 14.23, 0.2800 -> 0.28).
export function fmtValue(v) {
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }
  if (typeof v === "boolean") return v ? "yes" : "no";
  return v === null || v === undefined ? "" : String(v);
}

// Columns for a list of field objects (display fields, or an example's fields): one per scalar field,
// one per element of a short number array (grouped under the array's name); `skip` drops fields.
// Each column: {label, group, get(obj)}.
export function fieldColumns(objects, source = "display") {
  const first = objects.find((o) => o && Object.keys(o).length) || {};
  const columns = [];
  const entries = source === "display" ? displayExtras(first) : Object.entries(first);
  for (const [key, value] of entries) {
    if (["string", "number", "boolean"].includes(typeof value)) {
      columns.push({ label: key, group: null, get: (o) => o?.[key] });
    } else if (Array.isArray(value) && value.length <= MAX_ARRAY_COLUMNS && value.every((x) => typeof x === "number")) {
      value.forEach((_, i) => columns.push({ label: String(i), group: key, get: (o) => o?.[key]?.[i] }));
    } else if (Array.isArray(value)) {
      columns.push({ label: key, group: null, get: (o) => `${o?.[key]?.length ?? 0} values` });
    }
  }
  return columns;
}

// rows: [{fields, props, lead: [cells before the fields]}]; lead: header cells of the leading columns.
export function fieldsTable(columns, rows, { compact = false, lead = [], caption } = {}) {
  const grouped = columns.some((c) => c.group);
  const head = [];
  if (grouped) {
    const top = lead.map(() => h("th", {}));
    for (let i = 0; i < columns.length;) {
      let j = i;
      while (j < columns.length && columns[j].group === columns[i].group) j += 1;
      top.push(h("th", { class: columns[i].group ? "group" : "", colspan: String(j - i), text: columns[i].group || "" }));
      i = j;
    }
    head.push(h("tr", {}, top));
  }
  head.push(h("tr", {}, lead.map((t) => h("th", { text: t })),
    columns.map((c) => h("th", { class: "num", title: c.group ? `${c.group}[${c.label}]` : c.label, text: c.label }))));
  const body = rows.map((row) => h("tr", row.props || {}, row.lead || [],
    columns.map((c) => {
      const v = c.get(row.fields);
      return h("td", { class: typeof v === "number" ? "num" : "", title: v === undefined ? "" : String(v), text: fmtValue(v) });
    })));
  return h("table", { class: `fields${compact ? " compact" : ""}` },
    caption ? h("caption", { text: caption }) : null, h("thead", {}, head), h("tbody", {}, body));
}

export function flippedBadge(display, labelName) {
  if (display?.flipped !== true) return null;
  const orig = display.original_label;
  const text = orig === undefined || orig === null ? "flipped" : `flipped · was ${labelName(orig)}`;
  return h("span", { class: "badge badge-flip", title: "the stored display fields mark this training label as flipped",
    text });
}

export function labelChip(label, labelName, extraClass = "") {
  return h("span", { class: `label-chip ${extraClass}`, title: `label ${label}`, text: labelName(label) });
}

// -- hits -------------------------------------------------------------------------------------

// extra(hit) -> a node appended to the hit's card (e.g. the set members it affects most), or null.
export function hitList(hits, { kind, labelName, onOpen, textTask, extra = null }) {
  const maxAbs = Math.max(1e-30, ...hits.map((x) => Math.abs(x.score)));
  const tabular = hits.length > 0 && !hits.some((x) => hasVisual(x.display));
  const list = h("ol", { class: `hits hits-${kind}${textTask ? " hits-text" : ""}${tabular ? " hits-fields" : ""}`,
    "data-kind": kind });
  hits.forEach((hit, i) => {
    const d = hit.display || {};
    // Tabular: the display fields are the table (below); elsewhere they are a line of extras.
    const extras = tabular ? [] : displayExtras(d).filter(([, v]) => String(v) !== labelName(hit.label));
    const bar = h("div", { class: "score-bar" }, h("span", { style: { width: `${(100 * Math.abs(hit.score)) / maxAbs}%` } }));
    const li = h("li", {
      class: `hit${d.flipped === true ? " flipped" : ""}`,
      "data-id": hit.id, "data-score": String(hit.score), "data-label": String(hit.label),
      tabindex: "0", role: "button", title: `explain training example ${hit.id}`,
      onclick: () => onOpen(hit.id),
      onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); onOpen(hit.id); } },
    },
    h("span", { class: "rank", text: String(i + 1) }),
    tabular ? null : exampleVisual(d, { size: "md", lines: textTask ? 3 : 2 }),
    h("div", { class: "hit-meta" },
      h("div", { class: "hit-top" },
        h("span", { class: "hit-id mono", text: hit.id }),
        labelChip(hit.label, labelName),
        flippedBadge(d, labelName)),
      extras.length ? h("div", { class: "extras muted", text: extras.map(([k, v]) => `${k}: ${v}`).join(" · ") }) : null,
      tabular ? exampleVisual(d, { drop: (k, v) => String(v) === labelName(hit.label) }) : null,
      h("div", { class: "hit-score" }, h("span", { class: "score mono", text: fmtScore(hit.score) }), bar),
      hit.checkpoints ? checkpointBars(hit.checkpoints, hit.losses) : null,
      hit.blocks ? blockTerms(hit.blocks) : null,
      extra ? extra(hit) : null));
    list.append(li);
  });
  if (!hits.length) list.append(h("li", { class: "none muted", text: "none" }));
  return list;
}

// Per-checkpoint terms of a score (they sum to it): one small bar each, up for positive, down for negative.
export function checkpointBars(terms, losses) {
  const maxAbs = Math.max(1e-30, ...terms.map((x) => Math.abs(x)));
  return h("div", { class: "ckpt-bars", "aria-label": "score by checkpoint" }, terms.map((t, i) => {
    const pct = (50 * Math.abs(t)) / maxAbs;
    const title = `checkpoint ${i + 1}: ${fmtScore(t)}` + (losses ? ` · training loss ${losses[i].toFixed(3)}` : "");
    return h("span", { class: `ckpt ${t >= 0 ? "pos" : "neg"}`, title },
      h("span", { class: "ckpt-fill", style: { height: `${Math.max(1, pct)}%`, [t >= 0 ? "bottom" : "top"]: "50%" } }));
  }));
}

// Per-layer terms of a score (they sum to it), shown on demand: a closed <details> listing each traced
// block's term with a bar (clicks inside do not open the hit).
export function blockTerms(blocks) {
  const entries = Object.entries(blocks);
  const maxAbs = Math.max(1e-30, ...entries.map(([, t]) => Math.abs(t)));
  const rows = entries.map(([name, t]) => h("div", { class: "block-term", "data-block": name, "data-term": String(t) },
    h("span", { class: "block-name mono", title: name, text: name }),
    h("span", { class: "block-track" },
      h("span", { class: `block-fill ${t >= 0 ? "pos" : "neg"}`, style: { width: `${Math.max(1, (100 * Math.abs(t)) / maxAbs)}%` } })),
    h("span", { class: "block-value mono", text: fmtScore(t) })));
  const box = h("details", { class: "blocks" }, h("summary", { text: `layers (${entries.length})` }), rows);
  box.addEventListener("click", (ev) => ev.stopPropagation());
  box.addEventListener("keydown", (ev) => ev.stopPropagation());
  return box;
}

// Label counts of a hit list, e.g. "3 ×7 · 5 ×2".
export function labelSummary(hits, labelName) {
  const counts = new Map();
  for (const x of hits) counts.set(x.label, (counts.get(x.label) || 0) + 1);
  return [...counts.entries()].sort((a, b) => b[1] - a[1]).map(([l, n]) => `${labelName(l)} ×${n}`).join(" · ");
}

// -- probabilities ----------------------------------------------------------------------------

export function probabilityBars(probabilities, { labelName, predicted, labelUsed, trueLabel, top = 10 }) {
  const order = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, top);
  if (probabilities.length <= top) order.sort((a, b) => a[1] - b[1]);
  // One grid for all rows (each .prob is display: contents): the label column is as wide as the longest name.
  return h("div", { class: "probs" }, order.map(([p, i]) => {
    const title = `${labelName(i)}: p = ${p.toFixed(4)}`;
    return h("div", {
      class: `prob${i === predicted ? " predicted" : ""}${i === labelUsed ? " used" : ""}${i === trueLabel ? " truth" : ""}`,
    },
    h("span", { class: "prob-label", title, text: labelName(i) }),
    h("span", { class: "prob-track", title }, h("span", { class: "prob-fill", style: { width: `${Math.max(0.5, 100 * p)}%` } })),
    h("span", { class: "prob-value mono", title, text: p >= 0.995 ? p.toFixed(3) : p.toFixed(2) }));
  }));
}

// -- histogram --------------------------------------------------------------------------------

export function niceLinearTicks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12 * span; v += step) out.push(+v.toPrecision(12));
  return out;
}

function logTicks(lo, hi) {
  const out = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** e;
      if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
    }
  }
  if (out.length > 9) return out.filter((v) => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9);
  return out;
}

// data: {edges: [n+1], counts: [n], flagged?: [n], log: bool}; band: [lo, hi] score range to shade.
// order: how the table runs ("descending": the highest scores first, "ascending": the lowest first), which
// decides the table offset of a bin's first row; xLabel: what the scores are.
export function drawHistogram(container, data, { band, flagName = "flipped", onBin, order = "descending",
  xLabel = "self-influence" } = {}) {
  clear(container);
  const width = Math.max(320, container.clientWidth || 900);
  const height = 170;
  const m = { l: 46, r: 12, t: 10, b: 28 };
  const W = width - m.l - m.r;
  const H = height - m.t - m.b;
  const { edges, counts, flagged, log } = data;
  const tx = (v) => (log ? Math.log10(v) : v);
  const x0 = tx(edges[0]);
  const x1 = tx(edges[edges.length - 1]);
  const sx = (v) => m.l + (W * (tx(v) - x0)) / (x1 - x0 || 1);
  const maxCount = Math.max(1, ...counts);
  const sy = (c) => m.t + H - (H * c) / maxCount;
  const svg = h("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "hist-svg", role: "img",
    "aria-label": `histogram of ${xLabel}` });

  for (const t of niceLinearTicks(0, maxCount, 4)) {
    svg.append(h("line", { class: "grid", x1: m.l, x2: m.l + W, y1: sy(t), y2: sy(t) }));
    svg.append(h("text", { class: "tick", x: m.l - 6, y: sy(t) + 4, "text-anchor": "end" }, fmtInt(t)));
  }
  if (band && Number.isFinite(band[0]) && Number.isFinite(band[1])) {
    const lo = Math.max(edges[0], Math.min(band[0], band[1]));
    const hi = Math.min(edges[edges.length - 1], Math.max(band[0], band[1]));
    if (hi >= lo) {
      const bx = sx(lo);
      const bw = Math.max(2, sx(hi) - bx);
      svg.append(h("rect", { class: "band", x: bx, y: m.t, width: bw, height: H },
        h("title", {}, `rows on this page: ${fmtScore(lo)} – ${fmtScore(hi)}`)));
    }
  }
  const total = counts.reduce((a, b) => a + b, 0);
  let above = total;
  let below = 0;
  counts.forEach((c, i) => {
    above -= c; // examples in higher bins = the table offset of this bin's first row (descending order)
    const offset = order === "ascending" ? below : above;
    below += c;
    const left = sx(edges[i]);
    const w = Math.max(1, sx(edges[i + 1]) - left - 1);
    const f = flagged ? flagged[i] : 0;
    const g = h("g", { class: "bin", "data-offset": String(offset) });
    g.append(h("rect", { class: "bar", x: left, y: sy(c), width: w, height: m.t + H - sy(c) }));
    if (f) g.append(h("rect", { class: "bar flag", x: left, y: sy(f), width: w, height: m.t + H - sy(f) }));
    g.append(h("rect", { class: "hit-area", x: left, y: m.t, width: w + 1, height: H }));
    const flagText = flagged ? ` (${fmtInt(f)} ${flagName})` : "";
    g.append(h("title", {}, `${fmtScore(edges[i])} – ${fmtScore(edges[i + 1])}: ${fmtInt(c)} examples${flagText}` +
      (onBin ? " — click to show these rows" : "")));
    if (onBin && c > 0) {
      const start = offset;
      g.addEventListener("click", () => onBin(start));
      g.setAttribute("class", "bin clickable");
    }
    svg.append(g);
  });
  svg.append(h("line", { class: "axis", x1: m.l, x2: m.l + W, y1: m.t + H, y2: m.t + H }));
  const ticks = log ? logTicks(edges[0], edges[edges.length - 1]) : niceLinearTicks(edges[0], edges[edges.length - 1], 7);
  for (const t of ticks) {
    const x = sx(t);
    if (x < m.l - 1 || x > m.l + W + 1) continue;
    svg.append(h("line", { class: "axis", x1: x, x2: x, y1: m.t + H, y2: m.t + H + 4 }));
    svg.append(h("text", { class: "tick", x, y: m.t + H + 16, "text-anchor": "middle" }, fmtScore(t)));
  }
  svg.append(h("text", { class: "axis-label", x: m.l + W, y: height - 1, "text-anchor": "end" },
    log ? `${xLabel} (log scale)` : xLabel));
  container.append(svg);
}

// Bins for scores (client-side histogram): log-spaced when asked and some scores are positive (scores <= the
// smallest positive one land in the first bin).
export function binScores(scores, flags, bins = 40, wantLog = true) {
  const finite = scores.filter(Number.isFinite);
  if (!finite.length) return null;
  let lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const positive = finite.filter((s) => s > 0);
  const log = wantLog && positive.length > 0 && hi > Math.min(...positive);
  if (log) lo = Math.min(...positive);
  const edges = [];
  for (let i = 0; i <= bins; i++) {
    const t = i / bins;
    edges.push(log ? 10 ** (Math.log10(lo) + t * (Math.log10(hi) - Math.log10(lo))) : lo + t * (hi - lo || 1));
  }
  const counts = new Array(bins).fill(0);
  const flagged = flags ? new Array(bins).fill(0) : null;
  scores.forEach((s, j) => {
    if (!Number.isFinite(s)) return;
    let i;
    if (log) i = s <= lo ? 0 : Math.floor((bins * (Math.log10(s) - Math.log10(lo))) / (Math.log10(hi) - Math.log10(lo) || 1));
    else i = Math.floor((bins * (s - lo)) / (hi - lo || 1));
    i = Math.min(bins - 1, Math.max(0, i));
    counts[i] += 1;
    if (flagged && flags[j]) flagged[i] += 1;
  });
  return { edges, counts, flagged, log };
}

// -- image input ------------------------------------------------------------------------------

// A side x side grayscale grid in 0..1 (1 = ink, as in digits / MNIST), shown large with a pixel grid.
// Load from an example, an uploaded image file (downscaled in a canvas), or draw with the mouse.
export class ImageInput {
  constructor(spec, onChange) {
    this.spec = spec; // {field, side, layout: 'flat'|'nested', min, max, integer}
    this.onChange = onChange;
    this.grid = new Float32Array(spec.side * spec.side);
    this.canvas = h("canvas", { class: "draw-canvas", width: 224, height: 224,
      title: "draw with the mouse (shift: erase)", "data-side": String(spec.side) });
    this.drawing = false;
    const paint = (ev) => this._paint(ev);
    this.canvas.addEventListener("pointerdown", (ev) => { this.drawing = true; this.canvas.setPointerCapture(ev.pointerId); paint(ev); });
    this.canvas.addEventListener("pointermove", (ev) => { if (this.drawing) paint(ev); });
    this.canvas.addEventListener("pointerup", () => { if (this.drawing) { this.drawing = false; this.onChange?.("draw"); } });
    this.render();
  }

  setFromExample(example) {
    const value = example?.[this.spec.field];
    const flat = Array.isArray(value) ? value.flat(2) : null;
    if (!flat || flat.length !== this.grid.length) return false;
    const { min, max } = this.spec;
    flat.forEach((v, i) => { this.grid[i] = Math.min(1, Math.max(0, (Number(v) - min) / (max - min))); });
    this.render();
    return true;
  }

  toExample() {
    const { min, max, side, layout, field, integer } = this.spec;
    const vals = Array.from(this.grid, (g) => {
      const v = min + g * (max - min);
      return integer ? Math.round(v) : Math.round(v * 1000) / 1000;
    });
    if (layout === "flat") return { [field]: vals };
    const rows = [];
    for (let r = 0; r < side; r++) rows.push(vals.slice(r * side, (r + 1) * side));
    return { [field]: rows };
  }

  clear() {
    this.grid.fill(0);
    this.render();
  }

  invert() {
    for (let i = 0; i < this.grid.length; i++) this.grid[i] = 1 - this.grid[i];
    this.render();
  }

  // Decode `file` with the browser, fit it into side x side (aspect kept, centered), grayscale,
  // ink = bright (inverted automatically when the image's border is light), contrast stretched.
  async loadFile(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      throw new Error(`${file.name || "the file"} is not an image this browser can decode (PNG, JPEG, GIF, WebP, BMP)`);
    }
    const { side } = this.spec;
    const dims = { width: bitmap.width, height: bitmap.height };
    const work = document.createElement("canvas");
    work.width = side;
    work.height = side;
    const ctx = work.getContext("2d", { willReadFrequently: true });
    // Sample the border colour on the full-size image first, to pad with the background.
    const probe = document.createElement("canvas");
    const pw = Math.min(64, bitmap.width);
    const ph = Math.min(64, bitmap.height);
    probe.width = pw;
    probe.height = ph;
    const pctx = probe.getContext("2d", { willReadFrequently: true });
    pctx.drawImage(bitmap, 0, 0, pw, ph);
    const pdata = pctx.getImageData(0, 0, pw, ph).data;
    let border = 0;
    let n = 0;
    for (let y = 0; y < ph; y++) {
      for (let x = 0; x < pw; x++) {
        if (x > 0 && y > 0 && x < pw - 1 && y < ph - 1) continue;
        const j = 4 * (y * pw + x);
        border += lum(pdata, j);
        n += 1;
      }
    }
    border /= Math.max(1, n);
    const bg = Math.round(255 * border);
    ctx.fillStyle = `rgb(${bg},${bg},${bg})`;
    ctx.fillRect(0, 0, side, side);
    const scale = Math.min(side / bitmap.width, side / bitmap.height);
    const w = bitmap.width * scale;
    const hgt = bitmap.height * scale;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, (side - w) / 2, (side - hgt) / 2, w, hgt);
    bitmap.close?.();
    const data = ctx.getImageData(0, 0, side, side).data;
    const invert = border > 0.5;
    let lo = 1;
    let hi = 0;
    for (let i = 0; i < this.grid.length; i++) {
      let v = lum(data, 4 * i);
      if (invert) v = 1 - v;
      this.grid[i] = v;
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    if (hi - lo > 0.05) for (let i = 0; i < this.grid.length; i++) this.grid[i] = (this.grid[i] - lo) / (hi - lo);
    this.render();
    return { inverted: invert, ...dims };
  }

  _paint(ev) {
    const rect = this.canvas.getBoundingClientRect();
    const { side } = this.spec;
    const fx = ((ev.clientX - rect.left) / rect.width) * side;
    const fy = ((ev.clientY - rect.top) / rect.height) * side;
    const radius = Math.max(0.6, side / 14);
    const erase = ev.shiftKey || ev.buttons === 2;
    for (let y = Math.floor(fy - radius - 1); y <= Math.ceil(fy + radius + 1); y++) {
      for (let x = Math.floor(fx - radius - 1); x <= Math.ceil(fx + radius + 1); x++) {
        if (x < 0 || y < 0 || x >= side || y >= side) continue;
        const d = Math.hypot(x + 0.5 - fx, y + 0.5 - fy);
        const a = Math.max(0, Math.min(1, radius + 0.5 - d));
        if (!a) continue;
        const i = y * side + x;
        this.grid[i] = erase ? Math.max(0, this.grid[i] - a) : Math.min(1, this.grid[i] + a * 0.6);
      }
    }
    this.render();
  }

  render() {
    const { side } = this.spec;
    const ctx = this.canvas.getContext("2d");
    const size = this.canvas.width;
    const cell = size / side;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, size, size);
    for (let i = 0; i < this.grid.length; i++) {
      const v = Math.round(255 * this.grid[i]);
      if (!v) continue;
      ctx.fillStyle = `rgb(${v},${v},${v})`;
      ctx.fillRect((i % side) * cell, Math.floor(i / side) * cell, Math.ceil(cell), Math.ceil(cell));
    }
    if (side <= 16) {
      ctx.strokeStyle = "rgba(255,255,255,0.12)";
      ctx.lineWidth = 1;
      for (let k = 1; k < side; k++) {
        ctx.beginPath();
        ctx.moveTo(Math.round(k * cell) + 0.5, 0);
        ctx.lineTo(Math.round(k * cell) + 0.5, size);
        ctx.moveTo(0, Math.round(k * cell) + 0.5);
        ctx.lineTo(size, Math.round(k * cell) + 0.5);
        ctx.stroke();
      }
    }
  }
}

function lum(data, j) {
  const a = data[j + 3] / 255;
  const y = (0.299 * data[j] + 0.587 * data[j + 1] + 0.114 * data[j + 2]) / 255;
  return a * y + (1 - a); // transparent = white paper
}

// -- the task's example schema -> which input to show -----------------------------------------

const IMAGE_NAMES = /^(pixels|image|img|x|input|picture)$/i;
const TEXT_NAMES = /^(text|sentence|document|content|body|input_text|query)$/i;

function resolve(schema, root) {
  if (schema && schema.$ref && root?.$defs) return root.$defs[schema.$ref.split("/").pop()] || schema;
  return schema;
}

function rangeFrom(description, fallback) {
  const m = /(-?\d+(?:\.\d+)?)\s*\.\.\s*(-?\d+(?:\.\d+)?)/.exec(description || "");
  return m ? { min: Number(m[1]), max: Number(m[2]) } : fallback;
}

function sideFrom(description) {
  const m = /(\d+)\s*[x×]\s*(\d+)/.exec(description || "");
  return m && m[1] === m[2] ? Number(m[1]) : null;
}

// {kind: 'image', field, side, layout, min, max, integer} | {kind: 'image-file', field} | {kind: 'text', field} |
// {kind: 'json'}
export function inputSpec(schema) {
  const props = schema?.properties || {};
  const names = Object.keys(props);
  for (const name of names) {
    const p = resolve(props[name], schema);
    const variants = (p.anyOf || p.oneOf || [p]).map((v) => resolve(v, schema));
    const description = `${p.description || ""} ${schema.description || ""}`;
    const range = rangeFrom(description, { min: 0, max: 255 });
    const integer = Number.isInteger(range.min) && Number.isInteger(range.max) && range.max - range.min >= 8;
    for (const v of variants) {
      if (v.type !== "array") continue;
      const items = resolve(v.items, schema) || {};
      if (items.type === "number" || items.type === "integer") {
        const n = v.minItems;
        const side = n && n === v.maxItems ? Math.round(Math.sqrt(n)) : sideFrom(description);
        if (side && side * side === (n || side * side) && (IMAGE_NAMES.test(name) || n >= 16)) {
          return { kind: "image", field: name, side, layout: "flat", ...range, integer };
        }
      }
      if (items.type === "array") {
        const side = (v.minItems && v.minItems === v.maxItems ? v.minItems : null) || sideFrom(description);
        if (side) return { kind: "image", field: name, side, layout: "nested", ...range, integer };
      }
    }
  }
  // An image sent as a base64 file (torchvision.image_classification): an upload, not a textarea.
  const fileField = names.find((n) => {
    const p = resolve(props[n], schema);
    return p.type === "string" && IMAGE_NAMES.test(n) && /base64/i.test(p.description || "");
  });
  if (fileField) return { kind: "image-file", field: fileField };
  const textField = names.find((n) => resolve(props[n], schema).type === "string" && TEXT_NAMES.test(n)) ||
    names.find((n) => resolve(props[n], schema).type === "string");
  if (textField && names.length === 1) return { kind: "text", field: textField };
  if (textField && (schema.required || []).length <= 1) return { kind: "text", field: textField };
  return { kind: "json" };
}

// Save a Blob as a file through a hidden link (the export buttons); the browser tests read the name back
// from document.body.dataset.lastExport.
export function downloadBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  document.body.dataset.lastExport = filename;
}
