// tracin-service influence dashboard: a client of the public REST API only (the reference dashboard).
// Views: #/explain[/query/<offset>|/train/<id>], #/self?ranking=&label=&offset=&k=, #/index.
import { api, ApiError, getApiKey, setApiKey } from "./api.js";
import { createSets } from "./sets.js";
import {
  ImageInput, binScores, clear, displayExtras, downloadBlob, drawHistogram, exampleVisual, fieldColumns, fieldsTable,
  flippedBadge, fmtInt, fmtScore, h, hasVisual, hitList, inputSpec, labelChip, labelSummary, probabilityBars, safeImageUrl,
} from "./widgets.js";

const $ = (id) => document.getElementById(id);

const state = {
  info: null, // GET /index
  spec: { kind: "json" },
  imageInput: null,
  queriesOffset: 0,
  queriesPage: 48,
  queryPage: null,
  current: null, // the query being explained
  trail: [],
  self: { label: "", offset: 0, k: 50, ranking: "" },
  review: null, // the ranking in use and the server's choices (from GET /label-review)
  lastPage: null,
  hist: new Map(), // label -> histogram data
  lastSelfItems: [],
  busy: 0,
  attempt: null, // the query asked for last: {source, id, failed}; the trail's last crumb while it fails
  rerun: null, // runs that query again (after its answer was cleared or it failed); null: nothing to repeat
  rerunId: "",
};

// -- labels -----------------------------------------------------------------------------------

function labelName(label) {
  const names = state.info?.class_names;
  const kind = state.info?.label_kind || "class";
  if (Array.isArray(label)) {  // a multi-label vector (0/1) or a multi-output regression target
    if (kind === "multilabel") {
      const on = label.map((v, i) => (Number(v) > 0.5 ? (names?.[i] ?? String(i)) : null)).filter((x) => x !== null);
      return on.length ? on.join(", ") : "(none)";
    }
    return label.map((v) => Number(v).toPrecision(4)).join(", ");
  }
  if (kind === "regression") return Number(label).toPrecision(4);
  if (names && Number.isInteger(Number(label)) && names[Number(label)] !== undefined) return names[Number(label)];
  return String(label);
}

function labelText(label) {
  const name = labelName(label);
  return name === String(label) ? name : `${label} · ${name}`;
}

// -- errors -----------------------------------------------------------------------------------

// Errors of these actions belong to the Explain view: the results of an earlier request are cleared, so
// that the page never shows an error banner above answers it does not belong to.
const EXPLAIN_CONTEXTS = new Set(["explain", "upload", "your example", "example JSON"]);

const sets = createSets({
  info: () => state.info, labelName: (l) => labelName(l), labelText: (l) => labelText(l),
  navigate: (hash) => navigate(hash), clearError: () => clearError(),
  guarded: (fn, context) => guarded(fn, context),
});

function showError(err, context = "") {
  if (EXPLAIN_CONTEXTS.has(context)) {  // the trail and "again" follow the query that failed, not the last answer
    if (state.attempt) state.attempt.failed = true;
    clearResults(`No result for ${state.attempt?.id ?? "this query"}: the request failed (see the error above).`);
  }
  const banner = $("error-banner");
  const e = err instanceof ApiError ? err : new ApiError(0, "client_error", err?.message || String(err));
  const where = context ? `${context}: ` : "";
  $("error-title").textContent = e.status ? `HTTP ${e.status} · ${e.code}` : e.code === "network_error" ? "network error" : "bad input";
  $("error-message").textContent = where + e.message;
  let hint = "";
  if (e.status === 401) hint = "Enter the service's API key in the field at the top right and press Save.";
  else if (e.status === 403) hint = "The API key is not allowed to do this.";
  else if (e.fields?.length) hint = `field${e.fields.length > 1 ? "s" : ""}: ${[...new Set(e.fields)].join(", ")}`;
  else if (e.status === 413) hint = "The request body is over the service's size limit.";
  $("error-hint").textContent = hint;
  banner.dataset.status = String(e.status || 0);
  banner.dataset.code = e.code;
  banner.hidden = false;
  $("key-form").classList.toggle("attention", e.status === 401);
  if (e.status === 401) $("api-key").focus();
}

function clearError() {
  $("error-banner").hidden = true;
  $("key-form").classList.remove("attention");
}

async function guarded(fn, context) {
  state.busy += 1;
  document.body.classList.add("busy");
  try {
    return await fn();
  } catch (err) {
    showError(err, context);
    return undefined;
  } finally {
    state.busy -= 1;
    if (!state.busy) document.body.classList.remove("busy");
  }
}

// -- start ------------------------------------------------------------------------------------

async function loadInfo() {
  const info = await api.index();
  state.info = info;
  state.spec = inputSpec(info.example_schema || {});
  renderChip();
  fillLabelSelects();
  buildCustomInput();
  $("opt-k").max = String(info.max_k || 100);
  const metricSel = $("opt-metric");
  metricSel.replaceChildren(...(info.metrics || [{ name: "loss", description: "the loss" }]).map((m) =>
    h("option", { value: m.name, title: m.description || "", text: m.name.replace(/_/g, " ") })));
  document.body.dataset.task = state.spec.kind;
  return info;
}

function renderChip() {
  const i = state.info;
  const chip = clear($("index-chip"));
  if (!i) return;
  const task = i.task?.ref?.split(":").pop() || "task";
  chip.append(
    h("span", { class: "chip-task", text: task }),
    h("span", { class: "sep", text: "·" }),
    h("span", { text: `${fmtInt(i.count)} examples` }),
    h("span", { class: "sep", text: "·" }),
    h("span", { class: i.approximate ? "approx" : "exact", text: `${i.faiss?.factory || "?"} ${i.approximate ? "approximate" : "exact"}` }),
  );
}

function fillLabelSelects() {
  const names = state.info?.class_names || [];
  for (const [id, first] of [["opt-label", "model's prediction"], ["opt-filter", "any"], ["si-label", "all"]]) {
    const sel = clear($(id));
    sel.append(h("option", { value: "", text: first }));
    names.forEach((n, i) => sel.append(h("option", { value: String(i), text: labelText(i) })));
  }
  $("si-label").value = state.self.label;
}

// -- explain: query input ---------------------------------------------------------------------

function buildCustomInput() {
  const box = clear($("custom-input"));
  const spec = state.spec;
  const raw = $("raw-example");
  if (spec.kind === "image") {
    $("custom-title").textContent = `Your image (${spec.side}×${spec.side}, ${spec.min}..${spec.max})`;
    state.imageInput = new ImageInput(spec, () => {
      raw.value = compactJson(state.imageInput.toExample());
      $("upload-note").textContent = "drawn by hand";
    });
    const file = h("input", { type: "file", id: "upload", accept: "image/*", class: "visually-hidden" });
    file.addEventListener("change", () => onUpload(file));
    box.append(h("div", { class: "image-input" },
      state.imageInput.canvas,
      h("div", { class: "image-tools" },
        h("label", { for: "upload", class: "button secondary", text: "Upload image…" }), file,
        h("button", { type: "button", class: "secondary", id: "invert", text: "Invert", onclick: () => {
          state.imageInput.invert();
          raw.value = compactJson(state.imageInput.toExample());
        } }),
        h("button", { type: "button", class: "secondary", id: "clear-canvas", text: "Clear", onclick: () => {
          state.imageInput.clear();
          raw.value = compactJson(state.imageInput.toExample());
          $("upload-note").textContent = "draw with the mouse (shift: erase)";
        } }),
        h("div", { class: "muted small", id: "upload-note", text: "draw with the mouse (shift: erase), or upload" }),
        h("button", { type: "button", class: "primary", id: "explain-custom", text: "Explain",
          onclick: () => guarded(explainCustom, "explain") }))));
  } else if (spec.kind === "image-file") {
    $("custom-title").textContent = "Your image (PNG or JPEG)";
    state.imageFile = null;
    const file = h("input", { type: "file", id: "upload-image", accept: "image/png,image/jpeg", class: "visually-hidden" });
    file.addEventListener("change", () => onUploadFile(file));
    box.append(h("div", { class: "image-input" },
      h("img", { id: "image-file-preview", class: "thumb thumb-lg", alt: "", hidden: true }),
      h("div", { class: "image-tools" },
        h("label", { for: "upload-image", class: "button secondary", text: "Upload image…" }), file,
        h("div", { class: "muted small", id: "upload-note", text: "sent as it is: the server converts and transforms it" }),
        h("button", { type: "button", class: "primary", id: "explain-custom", text: "Explain",
          onclick: () => guarded(explainCustom, "explain") }))));
  } else if (spec.kind === "text") {
    $("custom-title").textContent = `Your ${spec.field}`;
    const ta = h("textarea", { id: "custom-text", rows: "7", spellcheck: "false", placeholder: `type or paste ${spec.field}…` });
    ta.addEventListener("input", () => { raw.value = compactJson({ [spec.field]: ta.value }); });
    box.append(ta, h("div", { class: "row-end" },
      h("button", { type: "button", class: "primary", id: "explain-custom", text: "Explain",
        onclick: () => guarded(explainCustom, "explain") })));
  } else {
    $("custom-title").textContent = "Your example";
    box.append(h("p", { class: "muted small", text: "This task's example schema has no image or text field the dashboard " +
      "recognises: edit the example JSON below." }));
    $("raw-json").open = true;
  }
}

function showImageFile(url) {
  state.imageFile = url;
  const img = $("image-file-preview");
  if (img) { img.src = url; img.hidden = false; }
}

// An image file for a task that takes it as base64 (PNG / JPEG): read as a data URL and sent unchanged.
async function onUploadFile(input) {
  const file = input.files?.[0];
  input.value = "";
  if (!file) return;
  clearError();
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError(new ApiError(0, "bad_input", `${file.name} is not a PNG or JPEG file`), "upload");
    return;
  }
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  showImageFile(url);
  const example = { [state.spec.field]: url };
  $("raw-example").value = compactJson(example);
  $("upload-note").textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
  await guarded(() => explainExample(example, { source: "upload", id: file.name }), "explain");
}

async function onUpload(input) {
  const file = input.files?.[0];
  input.value = "";
  if (!file) return;
  clearError();
  let meta;
  try {
    meta = await state.imageInput.loadFile(file);
  } catch (err) {
    attempt({ source: "upload", id: file.name }, null);  // nothing to repeat: the file is not an image
    showError(new ApiError(0, "bad_input", err.message), "upload");
    return;
  }
  $("raw-example").value = compactJson(state.imageInput.toExample());
  $("upload-note").textContent = `${file.name}: ${meta.width}×${meta.height} → ${state.spec.side}×${state.spec.side}` +
    (meta.inverted ? ", inverted (light background)" : "");
  await guarded(() => explainExample(state.imageInput.toExample(), { source: "upload", id: file.name }), "explain");
}

function compactJson(value) {
  // Numbers arrays on few lines: readable and still valid JSON.
  return JSON.stringify(value, null, 1).replace(/\[\s+([-\d.,\s]+?)\s+\]/g, (m, inner) => `[${inner.replace(/\s+/g, "")}]`);
}

function setInputFromExample(example) {
  if (!example) return;
  $("raw-example").value = compactJson(example);
  if (state.spec.kind === "image") state.imageInput?.setFromExample(example);
  if (state.spec.kind === "image-file" && safeImageUrl(example[state.spec.field])) showImageFile(example[state.spec.field]);
  if (state.spec.kind === "text" && $("custom-text")) $("custom-text").value = example[state.spec.field] ?? "";
}

function explainCustom() {
  const spec = state.spec;
  let example;
  if (spec.kind === "image") example = state.imageInput.toExample();
  else if (spec.kind === "image-file") {
    if (!state.imageFile) {
      showError(new ApiError(0, "bad_input", "no image yet: upload a PNG or JPEG first"), "your example");
      return;
    }
    example = { [spec.field]: state.imageFile };
  } else if (spec.kind === "text") {
    const text = $("custom-text").value;
    if (!text.trim()) {
      attempt({ source: "text", id: "your example" }, null);
      showError(new ApiError(0, "bad_input", `${spec.field} is empty: type or paste some text first`), "your example");
      return;
    }
    example = { [spec.field]: text };
  } else return explainRaw();
  $("raw-example").value = compactJson(example);
  const source = spec.kind === "image" ? "drawing" : spec.kind === "image-file" ? "upload" : "text";
  return explainExample(example, { source, id: "your example" });
}

function explainRaw() {
  let example;
  try {
    example = JSON.parse($("raw-example").value);
  } catch (err) {
    attempt({ source: "json", id: "edited JSON" }, null);
    showError(new ApiError(0, "bad_input", `the example is not valid JSON (${err.message})`), "example JSON");
    return;
  }
  return explainExample(example, { source: "json", id: "edited JSON" });
}

// -- explain: held-out list -------------------------------------------------------------------

async function loadQueries(offset = state.queriesOffset) {
  const page = await api.queries(offset, state.queriesPage);
  state.queriesOffset = offset;
  state.queryPage = page;
  renderQueries();
}

function renderQueries() {
  const page = state.queryPage;
  const list = clear($("query-list"));
  const tabular = state.spec.kind === "json" && page && page.items.length > 0 && !page.items.some((q) => hasVisual(q.display));
  const images = state.spec.kind === "image" || state.spec.kind === "image-file";
  list.classList.toggle("query-list-text", !images && !tabular);
  list.classList.toggle("query-list-table", Boolean(tabular));
  list.classList.toggle("query-list-image", images);
  if (!page) return;
  if (tabular) renderQueryTable(list, page);
  else renderQueryItems(list, page);
  if (!page.items.length) list.append(h("p", { class: "muted small", text: "This index ships no held-out examples." }));
  pager($("queries-pager"), page.offset, page.items.length, page.total, state.queriesPage,
    (o) => guarded(() => loadQueries(o), "held-out examples"));
}

function queryTitle(q) {
  return `explain held-out example ${q.id}${q.label !== null && q.label !== undefined ? ` (label ${labelName(q.label)})` : ""}`;
}

// Tabular tasks: one row per held-out example (id, label, its display and example fields).
function renderQueryTable(list, page) {
  const displayCols = fieldColumns(page.items.map((q) => q.display), "display");
  const exampleCols = fieldColumns(page.items.map((q) => q.example), "example");
  const columns = [...displayCols.map((c) => ({ ...c, get: (row) => c.get(row.display) })),
    ...exampleCols.map((c) => ({ ...c, get: (row) => c.get(row.example) }))];
  const rows = page.items.map((q, i) => {
    const offset = page.offset + i;
    const active = state.current?.source === "held-out" && state.current.offset === offset;
    return {
      fields: q,
      props: { class: `query-item${active ? " active" : ""}`, "data-id": q.id, "data-offset": String(offset),
        tabindex: "0", title: queryTitle(q), onclick: () => navigate(`#/explain/query/${offset}`),
        onkeydown: (ev) => { if (ev.key === "Enter") navigate(`#/explain/query/${offset}`); } },
      lead: [h("td", { class: "mono", text: q.id }),
        h("td", {}, q.label !== null && q.label !== undefined ? h("span", { class: "query-label", text: labelName(q.label) }) : null)],
    };
  });
  list.append(h("div", { class: "table-scroll" }, fieldsTable(columns, rows, { compact: true, lead: ["id", "label"] })));
}

function renderQueryItems(list, page) {
  const images = state.spec.kind === "image" || state.spec.kind === "image-file";
  if (images) {
    // Cells wide enough for the longest class name under the thumbnail (digits: 8 a row; Fashion-MNIST: 4).
    const longest = Math.max(1, ...page.items.map((q) => (q.label === null || q.label === undefined ? 0 : labelName(q.label).length)));
    list.style.setProperty("--label-chars", String(longest));
  }
  page.items.forEach((q, i) => {
    const offset = page.offset + i;
    const active = state.current?.source === "held-out" && state.current.offset === offset;
    const d = q.display || {};
    list.append(h("button", {
      type: "button", class: `query-item${active ? " active" : ""}`, "data-id": q.id, "data-offset": String(offset),
      title: queryTitle(q), onclick: () => navigate(`#/explain/query/${offset}`),
    },
    images ? exampleVisual(d, { size: "sm" }) : exampleVisual(d, { lines: 1 }),
    q.label !== null && q.label !== undefined ? h("span", { class: "query-label", text: labelName(q.label) }) : null));
  });
}

function pager(el, offset, shown, total, size, go) {
  clear(el);
  const from = total ? offset + 1 : 0;
  const to = offset + shown;
  el.append(
    h("button", { type: "button", class: "ghost", "data-go": "prev", disabled: offset <= 0, title: "previous page",
      onclick: () => go(Math.max(0, offset - size)), text: "‹" }),
    h("span", { class: "pager-text", text: `${fmtInt(from)}–${fmtInt(to)} of ${fmtInt(total)}` }),
    h("button", { type: "button", class: "ghost", "data-go": "next", disabled: to >= total, title: "next page",
      onclick: () => go(offset + size), text: "›" }));
}

// -- explain: requests ------------------------------------------------------------------------

function queryOptions() {
  const k = Number($("opt-k").value) || 10;
  const body = { k };
  const filter = $("opt-filter").value;
  if (filter !== "") body.filter_label = Number(filter);
  const metric = $("opt-metric").value;
  if (metric && metric !== "loss") body.metric = metric;
  const normalize = $("opt-normalize").value;
  if (normalize && normalize !== "none") body.normalize = normalize;
  return body;
}

// The query about to be asked: what the trail shows as current and what "again" repeats, from before its
// first request (so that a failure anywhere, even before POST /influence, names it and not the last answer).
function attempt(meta, rerun) {
  state.attempt = { source: meta.source, id: meta.id, offset: meta.offset, failed: false };
  state.rerun = rerun;
  state.rerunId = meta.id;
}

function rerunOf(meta) {
  if (meta.source === "held-out") return () => navigate(`#/explain/query/${meta.offset}`);
  if (meta.source === "train") return () => navigate(`#/explain/train/${encodeURIComponent(meta.id)}`);
  return meta.example !== undefined ? () => guarded(() => explainExample(meta.example, meta), "explain") : null;
}

async function explainHeldOut(offset) {
  const known = state.queryPage?.items[offset - state.queryPage.offset];
  const meta = { source: "held-out", id: known?.id ?? `held-out #${offset}`, offset };
  attempt(meta, rerunOf(meta));
  const page = await api.queries(offset, 1);
  const q = page.items[0];
  if (!q) throw new ApiError(0, "bad_input", `there is no held-out example at position ${offset} (${page.total} in all)`);
  if (!q.example) throw new ApiError(0, "bad_input", `held-out example ${q.id} has no example JSON to post`);
  setInputFromExample(q.example);
  if (offset < state.queriesOffset || offset >= state.queriesOffset + state.queriesPage) {
    await loadQueries(Math.floor(offset / state.queriesPage) * state.queriesPage);
  }
  await explainExample(q.example, { source: "held-out", id: q.id, offset, trueLabel: q.label, display: q.display });
}

async function explainExample(example, meta) {
  clearError();
  attempt(meta, rerunOf({ ...meta, example }));
  const body = { example, ...queryOptions() };
  const label = $("opt-label").value;
  if (label !== "") body.label = Number(label);
  await runInfluence(body, { ...meta, example });
}

async function explainTrain(id) {
  clearError();
  attempt({ source: "train", id }, rerunOf({ source: "train", id }));
  const body = { train_id: id, ...queryOptions() };
  if ($("opt-exclude").checked) body.exclude_self = true;
  const [info] = await Promise.all([api.example(id)]);
  await runInfluence(body, { source: "train", id, info, display: info.display, trueLabel: info.label });
}

let influenceSeq = 0;

async function runInfluence(body, meta) {
  const results = $("results");
  const seq = ++influenceSeq;
  results.setAttribute("aria-busy", "true");
  try {
    const t0 = performance.now();
    const res = await api.influence(body);
    const roundTrip = performance.now() - t0;
    if (seq !== influenceSeq) return; // a later request was started meanwhile: its answer wins
    state.current = { ...meta, body, res, roundTrip };
    state.attempt = null;
    pushTrail(meta);
    renderResults();
    renderQueries();
  } catch (err) {
    if (seq !== influenceSeq) return; // a later request replaced this one: its outcome is the one shown
    throw err;
  } finally {
    if (seq === influenceSeq) results.removeAttribute("aria-busy");
  }
}

// Take the answer off the screen (it no longer matches the options, or a later request failed); offer to
// run the same query again.
function clearResults(message) {
  influenceSeq += 1; // an answer still on its way is dropped too
  state.current = null;
  $("results").removeAttribute("aria-busy");
  const box = clear($("results-body"));
  delete box.dataset.request;
  box.dataset.source = "";
  box.dataset.queryId = "";
  const again = state.rerun ? h("button", { type: "button", class: "secondary", id: "rerun",
    text: `Explain ${state.rerunId} again`, onclick: () => { clearError(); state.rerun(); } }) : null;
  box.append(h("div", { class: "empty", id: "results-cleared" }, h("p", { text: message }), again));
  renderTrail();
  renderQueries();
}

function onOptionsChanged() {
  if (state.current) clearResults("The query options changed: the answer shown was for the previous ones.");
}

function pushTrail(meta) {
  const key = `${meta.source}:${meta.id}`;
  const at = state.trail.findIndex((t) => t.key === key);
  if (at >= 0) state.trail = state.trail.slice(0, at + 1);
  else state.trail.push({ key, ...meta, hash: location.hash });
  if (state.trail.length > 12) state.trail = state.trail.slice(-12);
}

// The queries answered, in order, and (while it fails) the one asked for last, marked failed: a failed
// query is never shown as if the previous answer were its own.
function renderTrail() {
  const el = clear($("trail"));
  const failed = state.attempt?.failed ? state.attempt : null;
  const crumbs = failed ? [...state.trail.filter((t) => t.key !== `${failed.source}:${failed.id}`), failed] : state.trail;
  if (crumbs.length < 2 && !failed) return;
  el.append(h("span", { class: "muted", text: "trail" }));
  crumbs.forEach((t, i) => {
    const last = i === crumbs.length - 1;
    const hash = t.source === "train" ? `#/explain/train/${encodeURIComponent(t.id)}`
      : t.source === "held-out" ? `#/explain/query/${t.offset}` : null;
    if (i) el.append(h("span", { class: "sep", text: "›" }));
    if (last && failed) {
      el.append(h("span", { class: "crumb current failed", "data-failed": "true", title: "this query failed",
        text: t.id }), h("span", { class: "bad small", text: " failed" }));
    } else {
      el.append(last || !hash
        ? h("span", { class: last ? "crumb current" : "crumb", text: t.id })
        : h("a", { class: "crumb", href: hash, text: t.id }));
    }
  });
}

// -- explain: results -------------------------------------------------------------------------

function renderResults() {
  renderTrail();
  const { res, body } = state.current;
  const cur = state.current;
  const box = clear($("results-body"));
  const textTask = state.spec.kind === "text";
  box.dataset.request = JSON.stringify(body);
  box.dataset.source = cur.source;
  box.dataset.queryId = cur.id;

  // Query summary
  const facts = h("dl", { class: "facts" });
  const fact = (k, ...v) => facts.append(h("dt", { text: k }), h("dd", {}, ...v));
  if (cur.source === "train") {
    const info = cur.info;
    fact("training example", h("span", { class: "mono", text: cur.id }));
    fact("training label", labelChip(info.label, labelName), " ", flippedBadge(info.display, labelName));
    fact("self-influence", h("span", { class: "mono", text: fmtScore(info.self_influence) }),
      h("span", { class: "muted", text: ` rank ${fmtInt(info.rank)} of ${fmtInt(state.info?.count)}` }));
    fact("label used", labelChip(res.label_used, labelName), h("span", { class: "muted", text: " (stored training label)" }));
  } else {
    fact(cur.source === "held-out" ? "held-out example" : "query", h("span", { class: "mono", text: cur.id }));
    const p = res.prediction;
    const correct = cur.trueLabel !== undefined && cur.trueLabel !== null ? p.label === cur.trueLabel : null;
    fact("prediction", labelChip(p.label, labelName, "pred"),
      h("span", { class: "mono muted", text: ` p=${(p.probabilities[p.label] ?? 0).toFixed(3)}` }),
      correct === null ? null : h("span", { class: correct ? "ok" : "bad", text: correct ? " ✓ correct" : " ✗ wrong" }));
    if (cur.trueLabel !== undefined && cur.trueLabel !== null) fact("true label", labelChip(cur.trueLabel, labelName));
    fact("label used", labelChip(res.label_used, labelName),
      h("span", { class: "muted", text: body.label !== undefined ? " (given)" : " (model's prediction)" }));
    if (res.query?.self_influence !== null && res.query?.self_influence !== undefined) {
      fact("self-influence", h("span", { class: "mono", text: fmtScore(res.query.self_influence) }));
    }
  }
  const idx = res.index || {};
  fact("searched", h("span", { text: `${fmtInt(idx.candidates ?? idx.count)} of ${fmtInt(idx.count)} ` }),
    h("span", { class: idx.approximate ? "approx" : "exact", text: idx.approximate ? "approximate" : "exact" }),
    body.filter_label !== undefined ? h("span", { class: "muted", text: ` (train label ${labelName(body.filter_label)})` }) : null);
  const rr = res.rerank;
  fact("scores", h("span", { class: res.exact ? "exact" : "approx", text: res.exact ? "exact TracIn" : "index estimates" }),
    h("span", { class: "muted", text: rr ? ` (re-ranked: ${fmtInt(rr.candidates)} candidates, ${fmtInt(rr.depth)} per end, `
      + "rescored from the training examples)" : res.exact ? " (exact-mode index)" : " (re-ranking off: approximate)" }));
  fact("took", h("span", { class: "mono", text: `${res.took_ms.toFixed(1)} ms` }),
    h("span", { class: "muted", text: ` server · ${cur.roundTrip.toFixed(0)} ms round trip` }));

  let preview;
  if (cur.source === "train") preview = exampleVisual(cur.info.display, { size: "lg", lines: 6 });
  else if (state.spec.kind === "image" && cur.example) {
    const img = new ImageInput(state.spec);
    img.setFromExample(cur.example);
    img.canvas.classList.add("preview-canvas");
    img.canvas.removeAttribute("title");
    preview = img.canvas;
  } else if (state.spec.kind === "image-file" && safeImageUrl(cur.example?.[state.spec.field])) {
    preview = exampleVisual({ image: cur.example[state.spec.field] }, { size: "lg" });
  } else if (textTask && cur.example) {
    const d = cur.display || {};
    preview = h("div", { class: "snippet lines-8" },
      d.title ? h("div", { class: "snippet-title", text: d.title }) : null,
      h("div", { class: "snippet-body", text: d.title ? (d.snippet || cur.example[state.spec.field]) : cur.example[state.spec.field] }));
  } else if (cur.example && !hasVisual(cur.display)) preview = null; // tabular: the fields table below
  else preview = exampleVisual(cur.display || {}, { size: "lg" });
  // Tabular tasks: the query's feature values (and display fields) as a table across the summary.
  let fields = null;
  if (state.spec.kind === "json" && !hasVisual(cur.source === "train" ? cur.info.display : cur.display)) {
    const display = cur.source === "train" ? cur.info.display : cur.display;
    const example = cur.source === "train" ? null : cur.example;
    const columns = [...fieldColumns([display], "display").map((c) => ({ ...c, get: () => c.get(display) })),
      ...fieldColumns([example], "example").map((c) => ({ ...c, get: () => c.get(example) }))];
    if (columns.length) {
      fields = h("div", { class: "query-fields", id: "query-fields" },
        h("div", { class: "probs-title muted", text: cur.source === "train" ? "display fields" : "feature values" }),
        h("div", { class: "table-scroll" }, fieldsTable(columns, [{ fields: null }], { compact: true })));
    }
    if (cur.source === "train") preview = null;
  }

  const probs = res.prediction
    ? probabilityBars(res.prediction.probabilities, { labelName, predicted: res.prediction.label, labelUsed: res.label_used,
      trueLabel: cur.trueLabel })
    : null;

  const requestBox = h("details", { class: "request" },
    h("summary", { text: "request" }),
    h("pre", { class: "mono small", text: `POST /influence\n${compactJson(body)}` }));

  box.append(h("div", { class: `panel query-summary${preview ? "" : " no-preview"}`, id: "query-summary" },
    preview ? h("div", { class: "preview" }, preview) : null,
    h("div", { class: "facts-wrap" }, facts, requestBox),
    probs ? h("div", { class: "probs-wrap" }, h("div", { class: "probs-title muted", text: "probabilities (last checkpoint)" }), probs) : null,
    fields));

  const open = (id) => navigate(`#/explain/train/${encodeURIComponent(id)}`);
  // Most hits (both ends) are high-self-influence examples: say so at the top of the answer, where it adds
  // no height above it, and offer the normalised view in one click (the API's message in the title).
  const hint = (res.hints || []).find((x) => x.code === "high_self_influence");
  const hintLine = hint ? h("div", { class: "hint small", id: "hint-note", "data-code": hint.code, title: hint.message },
    h("span", { text: `${hint.in_top} of the ${hint.hits} hits (both ends) are in the top `
      + `${Math.round((100 * hint.top_ranks) / (state.info?.count || hint.top_ranks))}% by self-influence, often `
      + "mislabeled or odd examples that raw TracIn puts first. " }),
    h("button", { type: "button", class: "secondary small-button", id: "hint-normalize",
      text: `Show the normalised view (${hint.suggestion?.normalize || "train"})`, onclick: () => {
        $("opt-normalize").value = hint.suggestion?.normalize || "train";
        clearError();
        if (state.rerun) state.rerun();
      } })) : null;
  const column = (kind, hits, title, subtitle) => {
    const flipped = hits.filter((x) => x.display?.flipped === true).length;
    const hasFlip = hits.some((x) => typeof x.display?.flipped === "boolean");
    return h("div", { class: `panel hits-panel ${kind}`, id: kind },
      h("div", { class: "panel-head" },
        h("h2", {}, title, h("span", { class: "count", text: String(hits.length) })),
        h("span", { class: "muted small", text: subtitle })),
      kind === "proponents" ? hintLine : null,
      h("div", { class: "muted small summary-line" },
        `labels: ${labelSummary(hits, labelName) || "–"}`, hasFlip ? ` · flipped: ${flipped}/${hits.length}` : ""),
      hitList(hits, { kind, labelName, onOpen: open, textTask }));
  };
  const shown = [...res.proponents, ...res.opponents];
  const topShare = Math.max(1, Math.ceil(0.01 * (state.info?.count || 0)));
  const inTop = shown.filter((x) => (x.self_influence_rank ?? Infinity) <= topShare).length;
  const metricName = (res.metric?.name || "loss").replace(/_/g, " ");
  const norm = res.normalize && res.normalize !== "none" ? `, normalised (${res.normalize})` : "";
  const toward = res.metric?.name && res.metric.name !== "loss" ? `raised the ${metricName}` : `pushed toward ${labelName(res.label_used)}`;
  const away = res.metric?.name && res.metric.name !== "loss" ? `lowered the ${metricName}` : `pushed away from ${labelName(res.label_used)}`;
  box.append(h("div", { class: "hits-cols" },
    column("proponents", res.proponents, "Proponents", `${toward} · score > 0`),
    column("opponents", res.opponents, "Opponents", `${away} · score < 0`)));
  box.append(  // below the hits: the answer stays on the first screen
    h("div", { class: "panel muted small", id: "hits-note" },
    `${inTop} of the ${shown.length} hits shown are among the top 1% of training examples by self-influence `
    + `(rank ≤ ${fmtInt(topShare)}); scores: influence on the query's ${metricName}${norm}`
    + (shown.some((x) => x.checkpoints) ? "; bars under a score: its term at each checkpoint" : "")));
}

// -- label review (self-influence and the other rankings) -------------------------------------

let selfSeq = 0;

// The ranking in use: the one in the URL, else the server's default (learned from the first page).
function currentRanking() {
  return state.self.ranking || state.review?.default_ranking || "";
}

async function loadSelf() {
  const { label, offset, k } = state.self;
  $("si-label").value = label;
  $("si-k").value = String(k);
  const seq = ++selfSeq;
  const page = await api.labelReview(k, offset, label === "" ? undefined : label, state.self.ranking || undefined);
  if (seq !== selfSeq) return;
  state.review = { default_ranking: page.default_ranking, rankings: page.rankings, ranking: page.ranking,
    order: page.order, description: page.description };
  renderRankingSelect();
  state.lastSelfItems = page.items;
  state.lastPage = page;
  renderSelfTable(page);
  await guarded(() => loadHistogram(label), "label-review histogram");
}

const RANKING_TITLES = {
  combined: "combined (mean loss & AUM)", self_influence: "self-influence", loss: "loss (last checkpoint)",
  margin: "margin (last checkpoint)", aum: "AUM (margin over checkpoints)",
};

function renderRankingSelect() {
  const r = state.review;
  const select = clear($("si-ranking"));
  for (const name of r.rankings) {
    select.append(h("option", { value: name, text: `${RANKING_TITLES[name] || name}${name === r.default_ranking ? " · default" : ""}` }));
  }
  select.value = r.ranking;
  const arrow = r.order === "ascending" ? "lowest first" : "highest first";
  $("si-ranking-note").textContent = `${RANKING_TITLES[r.ranking] || r.ranking}, ${arrow}: ${r.description}`;
  $("si-score-head").textContent = RANKING_TITLES[r.ranking]?.split(" (")[0] || r.ranking;
  $("si-table").dataset.ranking = r.ranking;
}

function fmtProb(p) {
  return p === null || p === undefined ? "" : `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 1 : 0)}%`;
}

function renderSelfTable(page) {
  const { k } = state.self;
  const tbody = clear($("si-table").tBodies[0]);
  const ascending = page.order === "ascending";
  const hist = state.hist.get(histKey());
  const scores = page.items.map((x) => x.score);
  const lo = hist?.edges ? hist.edges[0] : Math.min(0, ...scores);
  const hi = hist?.edges ? hist.edges[hist.edges.length - 1] : Math.max(1e-30, ...scores);
  // bar length = how suspicious, on the scale of all training examples (the histogram's range)
  const base = ascending ? hi : Math.min(0, lo);
  const barOf = (score) => {
    const f = ascending ? (hi - score) / (hi - lo || 1) : (score - base) / (hi - base || 1);
    return Math.max(0, Math.min(1, f));
  };
  const textTask = state.spec.kind === "text";
  for (const item of page.items) {
    const d = item.display || {};
    const tabular = !hasVisual(d);
    const extras = tabular ? [] : displayExtras(d).filter(([, v]) => String(v) !== labelName(item.label));
    const open = () => navigate(`#/explain/train/${encodeURIComponent(item.id)}`);
    const prediction = item.prediction === null || item.prediction === undefined ? null : item.prediction;
    const suggested = item.suggested_label === null || item.suggested_label === undefined ? null : item.suggested_label;
    tbody.append(h("tr", {
      class: d.flipped === true ? "flipped" : "", "data-id": item.id, "data-score": String(item.score),
      "data-label": JSON.stringify(item.label), "data-prediction": prediction === null ? "" : JSON.stringify(prediction),
      "data-probability": item.probability === null || item.probability === undefined ? "" : String(item.probability),
      "data-suggested": suggested === null ? "" : JSON.stringify(suggested),
      tabindex: "0", title: `explain training example ${item.id}`,
      onclick: open, onkeydown: (ev) => { if (ev.key === "Enter") open(); },
    },
    h("td", { class: "num mono", text: fmtInt(item.rank) }),
    h("td", { class: textTask ? "visual text" : tabular ? "visual fields-cell" : "visual" },
      exampleVisual(d, { size: "sm", lines: 2, drop: (k, v) => String(v) === labelName(item.label) })),
    h("td", { class: "mono", text: item.id }),
    h("td", {}, labelChip(item.label, labelName)),
    h("td", { class: "pred-cell" }, prediction === null ? h("span", { class: "muted", text: "–" }) : [
      labelChip(prediction, labelName),
      item.probability === null || item.probability === undefined ? null
        : h("span", { class: "prob-text mono", text: ` ${fmtProb(item.probability)}` })]),
    h("td", { class: "suggest-cell" }, suggested === null ? h("span", { class: "muted small", text: "keep" })
      : h("span", { class: "suggest" }, "→ ", labelChip(suggested, labelName))),
    h("td", { class: "num mono", text: fmtScore(item.score) }),
    h("td", { class: "bar-col" }, h("div", { class: "score-bar" }, h("span", { style: { width: `${100 * barOf(item.score)}%` } }))),
    h("td", {}, flippedBadge(d, labelName), extras.length ? h("span", { class: "muted small", text: ` ${extras.map(([a, b]) => `${a}: ${b}`).join(" · ")}` }) : null)));
  }
  if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: "9", class: "muted", text: "no examples" })));
  const go = (o) => navigate(selfHash({ offset: o }));
  pager($("si-pager"), page.offset, page.items.length, page.total, k, go);
  pager($("si-pager-bottom"), page.offset, page.items.length, page.total, k, go);
  const hasFlip = page.items.some((x) => typeof x.display?.flipped === "boolean");
  const flipped = page.items.filter((x) => x.display?.flipped === true).length;
  $("si-flipped").textContent = hasFlip ? `flipped on this page: ${flipped}/${page.items.length}` : "";
  $("si-table").dataset.total = String(page.total);
}

// The ranked list as CSV or JSON (every row of the ranking and label filter), as a file download.
async function exportList(format) {
  const { label } = state.self;
  const { blob, filename } = await api.labelReviewExport(format, label === "" ? undefined : label,
    currentRanking() || undefined);
  downloadBlob(blob, filename);
}

// Histograms are cached per label and x scale ("log x" asks the server for log- or linear-spaced bins).
function histScale() {
  return $("hist-log").checked ? "log" : "linear";
}

function histKey(label = state.self.label) {
  return `${label}|${histScale()}|${currentRanking()}`;
}

async function loadHistogram(label) {
  const key = histKey(label);
  let data = state.hist.get(key);
  if (!data) {
    data = await fetchHistogram(label, histScale(), currentRanking());
    state.hist.set(key, data);
  }
  if (key === histKey()) {
    renderHistogram();
    if (state.lastSelfItems.length && data.edges) {  // bars on the histogram's scale
      renderSelfTable({ ...state.lastPage, items: state.lastSelfItems });
    }
  }
}

async function fetchHistogram(label, scale, ranking) {
  const lab = label === "" ? undefined : label;
  try {
    const r = await api.labelReviewHistogram(40, lab, scale, ranking || undefined);
    return { edges: r.edges, counts: r.counts, flagged: r.flagged?.flipped || null, log: r.scale === "log",
      total: r.total, used: r.total, max: r.edges[r.edges.length - 1], source: "server", serverScale: r.scale,
      order: r.order, ranking: r.ranking };
  } catch (err) {
    if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 405)) throw err;
  }
  // No histogram route: page through /self-influence/top (scores in descending order), up to a cap.
  const cap = 10000;
  let size = 1000;
  let first;
  try {
    first = await api.selfInfluence(size, 0, lab);
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 422) throw err;
    size = 100;
    first = await api.selfInfluence(size, 0, lab);
  }
  const items = [...first.items];
  const want = Math.min(first.total, cap);
  const offsets = [];
  for (let o = size; o < want; o += size) offsets.push(o);
  for (let i = 0; i < offsets.length; i += 4) {
    const pages = await Promise.all(offsets.slice(i, i + 4).map((o) => api.selfInfluence(Math.min(size, want - o), o, lab)));
    for (const p of pages) items.push(...p.items);
  }
  const scores = items.map((x) => x.score);
  const hasFlip = items.some((x) => typeof x.display?.flipped === "boolean");
  const flags = hasFlip ? items.map((x) => x.display?.flipped === true) : null;
  return { scores, flags, total: first.total, used: items.length, max: scores[0] ?? 0, source: "client" };
}

function renderHistogram() {
  const raw = state.hist.get(histKey());
  const el = $("si-histogram");
  if (!raw) return;
  const wantLog = $("hist-log").checked;
  let data = raw;
  if (raw.source === "client") data = { ...raw, ...binScores(raw.scores, raw.flags, 40, wantLog) };
  const items = state.lastSelfItems;
  const band = items.length ? [items[items.length - 1].score, items[0].score] : null;
  const ranking = raw.ranking || "self_influence";
  drawHistogram(el, data, {
    band,
    order: raw.order || "descending",
    xLabel: RANKING_TITLES[ranking]?.split(" (")[0] || ranking,
    onBin: (offset) => navigate(selfHash({ offset })),
  });
  const flippedTotal = data.flagged ? data.flagged.reduce((a, b) => a + b, 0) : null;
  const parts = [`${fmtInt(raw.used)} example${raw.used === 1 ? "" : "s"}`];
  if (raw.used < raw.total) parts.push(`the top ${fmtInt(raw.used)} of ${fmtInt(raw.total)} (no histogram route on this server)`);
  if (flippedTotal !== null) parts.push(`${fmtInt(flippedTotal)} flipped (amber)`);
  parts.push("shaded: rows on this page; click a bar to jump there");
  $("hist-note").textContent = parts.join(" · ");
  el.dataset.source = raw.source;
  el.dataset.scale = data.log ? "log" : "linear";
  el.dataset.ranking = ranking;
}

function selfHash(change = {}) {
  const s = { ...state.self, ...change };
  const p = new URLSearchParams();
  if (s.ranking) p.set("ranking", s.ranking);
  if (s.label !== "") p.set("label", s.label);
  if (s.offset) p.set("offset", String(s.offset));
  if (s.k !== 50) p.set("k", String(s.k));
  const q = p.toString();
  return `#/self${q ? `?${q}` : ""}`;
}

// -- index ------------------------------------------------------------------------------------

// Which TracIn formula the index weighs gradients with (GET /index `optimizer`, issue 18): plain SGD's lr per
// parameter group, or lr * Gamma from the Adam / RMSprop / Adagrad state saved with each checkpoint.
const FORMULA_TEXT = {
  sgd: "lr · g (each parameter's group lr)",
  adam: "lr · Γ ⊙ g, Γ = 1/(√v̂ + ε) from the saved Adam state",
  rmsprop: "lr · Γ ⊙ g, Γ = 1/(√v + ε) from the saved RMSprop state",
  adagrad: "lr · Γ ⊙ g, Γ = 1/(√Σg² + ε) from the saved Adagrad state",
  mixed: "per checkpoint (see the checkpoints table)",
};

function renderIndex() {
  const i = state.info;
  const panel = clear($("index-panel"));
  if (!i) {
    panel.append(h("div", { class: "panel muted", text: "The index summary could not be loaded (see the error above)." }));
    return;
  }
  const card = (title, ...body) => h("div", { class: "panel card" }, h("h2", { text: title }), ...body);
  const kv = (pairs) => h("dl", { class: "facts" }, pairs.filter(Boolean).flatMap(([k, v]) =>
    [h("dt", { text: k }), h("dd", {}, v instanceof Node ? v : h("span", { text: String(v) }))]));
  const mono = (t) => h("span", { class: "mono", text: t });
  const optimizerCard = (o) => (!o ? card("Optimizer", h("p", { class: "muted small",
    text: "not recorded (an index built before optimizer-aware TracIn)" })) :
    h("div", { class: "panel card", id: "optimizer-card" }, h("h2", { text: "Optimizer" }),
      kv([
        ["formula", h("span", {}, h("span", { class: "mono", id: "optimizer-formula", text: o.formula }),
          h("span", { class: "muted", text: ` · ${FORMULA_TEXT[o.formula] || ""}` }))],
        ["why", h("span", { id: "optimizer-why", text: o.why })],
        o.forced ? ["forced", "the plain formula, forced by the config ([optimizer] formula)"] : null,
        ["momentum", mono(o.momentum ?? "ignore")],
        o.bounded ? ["bounded Γ", mono(`${fmtInt(o.bounded)} coordinates (second moment 0)`)] : null,
      ])));
  const f = i.faiss || {};
  const recallKeys = Object.keys(f).filter((k) => /recall/i.test(k));
  const approx = h("span", { class: i.approximate ? "approx" : "exact", text: i.approximate ? "approximate" : "exact" });
  const recall = recallKeys.length ? recallKeys.map((k) => recallText(k, f[k])).join("; ")
    : i.approximate ? "not recorded in the manifest" : "1 (exact search)";
  const lrs = (i.checkpoints || []).map((c) => c.lr);
  const p = i.projection || {};
  const rawBytes = (i.count || 0) * (i.embedding_dim || 0) * 4;
  const tile = (label, value, cls = "") => h("div", { class: `tile ${cls}` },
    h("div", { class: "tile-value", text: value }), h("div", { class: "tile-label", text: label }));
  const recallTile = recallKeys.length ? recallValue(f[recallKeys[0]]) : i.approximate ? "?" : "1";
  panel.append(h("div", { class: "panel summary-strip" },
    tile("training examples", fmtInt(i.count)),
    tile("embedding dim", fmtInt(i.embedding_dim)),
    tile("checkpoints", String((i.checkpoints || []).length)),
    tile("traced layers", String((i.layers || []).length)),
    tile("projection", `${p.kind ?? "?"}${p.dim ? ` ${p.dim}` : ""}`),
    tile("search", i.approximate ? "approximate" : "exact", i.approximate ? "tile-approx" : "tile-exact"),
    tile(i.approximate ? "measured recall (min)" : "recall (exact search)", recallTile, i.approximate ? "tile-approx" : ""),
    tile("raw vectors (float32)", fmtBytes(rawBytes)),
    tile("exact re-ranking", i.rerank?.available ? `K' = ${i.rerank.default}` : "off",
      i.rerank?.available ? "tile-exact" : "tile-approx")));

  panel.append(
    card("Model",
      kv([
        ["task", mono(i.task?.ref || "?")],
        Object.keys(i.task?.args || {}).length ? ["task args", mono(JSON.stringify(i.task.args))] : null,
        ["classes", i.class_names ? `${i.class_names.length}: ${i.class_names.join(", ")}` : "–"],
        ["created", i.created_at || "–"],
        ["path", mono(i.path)],
      ])),
    card("Index",
      kv([
        ["training examples", mono(fmtInt(i.count))],
        ["raw vectors", mono(`${fmtInt(i.count)} × ${fmtInt(i.embedding_dim)} float32 = ${fmtBytes(rawBytes)}`)],
        ["held-out queries", mono(fmtInt(i.queries))],
        ["embedding dim", mono(fmtInt(i.embedding_dim))],
        ["FAISS", h("span", {}, mono(f.factory || "?"), " ", approx, h("span", { class: "muted", text: ` · ${f.metric || ""}` }))],
        ["measured recall", recall],
        ["search params", mono(JSON.stringify(f.search_params_in_use ?? f.search_params ?? {}))],
        ["memory-mapped", i.mmap ? "yes" : "no"],
        ["max k", mono(String(i.max_k))],
      ])),
    optimizerCard(i.optimizer),
    card("Projection",
      kv([
        ["kind", mono(p.kind ?? "?")],
        ["dim per layer", mono(String(p.dim ?? "–"))],
        p.dim_per_checkpoint !== undefined ? ["dim per checkpoint", mono(String(p.dim_per_checkpoint))] : null,
        ["seed", mono(String(p.seed ?? "–"))],
        ["fingerprint", h("span", { class: "mono small", title: p.fingerprint || "", text: p.fingerprint ? `${p.fingerprint.slice(0, 16)}…` : "–" })],
      ])),
    h("div", { class: "panel card wide" }, h("h2", { text: `Checkpoints (${(i.checkpoints || []).length}) · Σ lr = ${fmtScore(lrs.reduce((a, b) => a + b, 0))}` }),
      h("div", { class: "table-scroll" }, h("table", { class: "plain", id: "checkpoints-table" },
        h("thead", {}, h("tr", {}, h("th", { text: "#" }), h("th", { text: "file" }), h("th", { class: "num", text: "learning rate" }),
          h("th", { text: "" }), h("th", { text: "formula" }), h("th", { text: "group lrs" }), h("th", { text: "sha256" }))),
        h("tbody", {}, (i.checkpoints || []).map((c, n) => h("tr", {},
          h("td", { class: "mono", text: String(n) }),
          h("td", { class: "mono nowrap", text: c.file }),
          h("td", { class: "num mono", text: fmtScore(c.lr) }),
          h("td", { class: "bar-col" }, h("div", { class: "score-bar" }, h("span", { style: { width: `${(100 * c.lr) / Math.max(...lrs)}%` } }))),
          h("td", { class: "formula", text: c.formula ?? "sgd" }),
          h("td", { class: "mono small group-lrs", title: "learning rate of each parameter group (traced parameter tensors in it)",
            text: (c.groups || []).map((g) => `${fmtScore(g.lr)} (${g.params})`).join(" · ") || "–" }),
          h("td", { class: "mono small muted", title: c.sha256, text: c.sha256.slice(0, 12) }))))))),
    h("div", { class: "panel card full", id: "blocks-card" }, h("h2", { text: `Traced blocks (${(i.layers || []).length})` }),
      h("div", { class: "table-scroll", id: "blocks-scroll" }, h("table", { class: "plain", id: "blocks-table" },
        h("thead", {}, h("tr", {}, ["name", "kind", "gradient shape", "capture route", "projection", "dim"]
          .map((t) => h("th", { text: t })))),
        h("tbody", {}, (i.layers || []).map((l) => h("tr", {},
          h("td", { class: "mono", text: l.name }), h("td", { text: l.kind }),
          h("td", { class: "mono", text: Array.isArray(l.shape) ? l.shape.join("×") : String(l.shape ?? "") }),
          h("td", { text: l.route ?? "", title: l.reason ?? "" }),
          h("td", { text: l.projection ?? "" }), h("td", { class: "mono", text: String(l.dim ?? "") }))))))),
    card("Versions",
      kv(Object.entries(i.versions || {}).map(([k, v]) => [k, mono(v)]))),
    card("Example schema",
      h("p", { class: "muted small", text: `dashboard input: ${state.spec.kind}${state.spec.field ? ` (field “${state.spec.field}”)` : ""}` }),
      h("pre", { class: "mono small schema", text: JSON.stringify(i.example_schema, null, 2) })),
  );
}

// recall_at_10 is {"proponents": r, "opponents": r, "k": 10, "queries": n} (or a number).
function recallValue(v) {
  if (typeof v === "number") return v.toFixed(3);
  if (v && typeof v === "object") {
    const rs = ["proponents", "opponents"].map((k) => v[k]).filter((x) => typeof x === "number");
    return rs.length ? Math.min(...rs).toFixed(3) : "?";
  }
  return "?";
}

function recallText(key, v) {
  if (typeof v === "number") return `${key} = ${v.toFixed(4)}`;
  if (v && typeof v === "object") {
    const parts = ["proponents", "opponents"].filter((k) => typeof v[k] === "number").map((k) => `${k} ${v[k].toFixed(4)}`);
    const k = v.k ? `recall@${v.k}` : key;
    return `${k}: ${parts.join(" · ")}${v.queries ? ` (${v.queries} queries vs exact search)` : ""}`;
  }
  return `${key} = ${JSON.stringify(v)}`;
}

function fmtBytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let u = 0;
  while (n >= 1000 && u < units.length - 1) { n /= 1000; u += 1; }
  return `${n >= 100 || u === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[u]}`;
}

// -- routing ----------------------------------------------------------------------------------

function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function showView(name) {
  for (const v of ["explain", "set", "self", "index"]) {
    $(`view-${v}`).hidden = v !== name;
    $(`tab-${v}`).classList.toggle("active", v === name);
    if (v === name) $(`tab-${v}`).setAttribute("aria-current", "page");
    else $(`tab-${v}`).removeAttribute("aria-current");
  }
  document.body.dataset.view = name;
}

async function route() {
  const hash = location.hash || "#/explain";
  const [path, query = ""] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  const view = parts[0] || "explain";
  clearError(); // a banner belongs to the action that raised it
  if (!state.info) {
    await guarded(loadInfo, "GET /index");
  }
  if (view === "self") {
    showView("self");
    const p = new URLSearchParams(query);
    state.self = { label: p.get("label") ?? "", offset: Math.max(0, Number(p.get("offset")) || 0),
      k: Number(p.get("k")) || 50, ranking: p.get("ranking") ?? "" };
    await guarded(loadSelf, "label review");
  } else if (view === "index") {
    showView("index");
    renderIndex();
  } else if (view === "set") {
    showView("set");
    if (state.info) await guarded(sets.load, "held-out set");
  } else {
    showView("explain");
    if (!state.queryPage && state.info) await guarded(() => loadQueries(0), "held-out examples");
    if (parts[1] === "query" && parts[2] !== undefined) {
      await guarded(() => explainHeldOut(Number(parts[2])), "explain");
    } else if (parts[1] === "train" && parts[2] !== undefined) {
      await guarded(() => explainTrain(decodeURIComponent(parts.slice(2).join("/"))), "explain");
    }
  }
  document.body.dataset.ready = "true";
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = getApiKey();
  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setApiKey(keyInput.value.trim());
    clearError();
    state.info = null;
    state.queryPage = null;
    state.hist.clear();
    sets.reset();
    $("key-save").textContent = "Saved";
    setTimeout(() => { $("key-save").textContent = "Save"; }, 1200);
    await route();
  });
  $("error-close").addEventListener("click", clearError);
  sets.init();
  $("raw-run").addEventListener("click", () => guarded(explainRaw, "explain"));
  $("si-label").addEventListener("change", () => navigate(selfHash({ label: $("si-label").value, offset: 0 })));
  $("si-k").addEventListener("change", () => navigate(selfHash({ k: Number($("si-k").value), offset: 0 })));
  $("si-ranking").addEventListener("change", () => {
    const value = $("si-ranking").value;
    navigate(selfHash({ ranking: value === state.review?.default_ranking ? "" : value, offset: 0 }));
  });
  $("si-export-csv").addEventListener("click", () => guarded(() => exportList("csv"), "export"));
  $("si-export-json").addEventListener("click", () => guarded(() => exportList("json"), "export"));
  $("hist-log").addEventListener("change", () => guarded(() => loadHistogram(state.self.label), "label-review histogram"));
  for (const id of ["opt-k", "opt-label", "opt-filter", "opt-exclude", "opt-metric", "opt-normalize"]) {
    $(id).addEventListener("change", onOptionsChanged);
  }
  let resizeTimer;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (!$("view-self").hidden) renderHistogram(); }, 150);
  });
  window.addEventListener("hashchange", route);
  route();
}

init();
