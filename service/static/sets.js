// The Sets view: explain several held-out examples at once (POST /influence with `examples`, `labels` and
// `aggregate`): which training examples helped or hurt the set's summed (or mean) metric, exact after
// re-ranking, and which members each of them affects most (`member_scores`). Exports the answer as CSV/JSON.
import { api, ApiError } from "./api.js";
import { clear, downloadBlob, exampleVisual, fmtInt, fmtScore, h, hitList, labelChip, labelSummary } from "./widgets.js";

const $ = (id) => document.getElementById(id);
const LOAD = 1000; // held-out examples listed (one GET /queries?predictions=true)
const TOP_MEMBERS = 3;

// ctx: {info(), labelName, labelText, navigate, clearError, showError}
export function createSets(ctx) {
  const st = { items: null, total: 0, selected: new Set(), answer: null, body: null, memberIds: [], seq: 0 };

  async function load() {
    if (!st.items) {
      const page = await api.queries(0, LOAD, true);
      st.items = page.items;
      st.total = page.total;
      fillSelects();
    }
    renderPicker();
  }

  function fillSelects() {
    const info = ctx.info();
    const names = info?.class_names || [];
    const cls = clear($("set-class"));
    const present = [...new Set(st.items.map((q) => q.label).filter((l) => l !== null && l !== undefined))]
      .sort((a, b) => Number(a) - Number(b));
    (names.length ? names.map((_, i) => i) : present).forEach((c) => cls.append(h("option", { value: String(c),
      text: `${ctx.labelText(c)} (${st.items.filter((q) => q.label === c).length})` })));
    const metric = clear($("set-metric"));
    (info?.metrics || [{ name: "loss", description: "the loss" }]).forEach((m) =>
      metric.append(h("option", { value: m.name, title: m.description || "", text: m.name.replace(/_/g, " ") })));
    $("set-k").max = String(info?.max_k || 100);
  }

  const wrong = (q) => q.prediction && q.label !== null && q.label !== undefined
    && JSON.stringify(q.prediction.label) !== JSON.stringify(q.label);

  function renderPicker() {
    const list = clear($("set-list"));
    const image = document.body.dataset.task === "image";
    list.classList.toggle("set-list-image", image);
    st.items.forEach((q, i) => {
      const on = st.selected.has(i);
      const bad = wrong(q);
      list.append(h("button", {
        type: "button", class: `set-item${on ? " selected" : ""}${bad ? " misclassified" : ""}`, "data-id": q.id,
        "data-offset": String(i), "aria-pressed": on ? "true" : "false",
        title: `${q.id}: label ${q.label === null || q.label === undefined ? "–" : ctx.labelName(q.label)}` +
          (q.prediction ? `, predicted ${ctx.labelName(q.prediction.label)}` : ""),
        onclick: () => toggle(i),
      },
      exampleVisual(q.display || {}, { size: "sm", lines: 1 }),
      h("span", { class: "set-item-label" },
        q.label !== null && q.label !== undefined ? ctx.labelName(q.label) : "–",
        bad ? h("span", { class: "bad", text: ` ✗ ${ctx.labelName(q.prediction.label)}` }) : null)));
    });
    const misclassified = st.items.filter(wrong).length;
    $("set-count").textContent = `${fmtInt(st.selected.size)} selected of ${fmtInt(st.items.length)}` +
      (st.total > st.items.length ? ` (the first ${fmtInt(st.items.length)} of ${fmtInt(st.total)})` : "") +
      ` · ${fmtInt(misclassified)} misclassified`;
    $("set-run").disabled = st.selected.size === 0;
  }

  function toggle(i) {
    if (st.selected.has(i)) st.selected.delete(i);
    else st.selected.add(i);
    renderPicker();
  }

  function select(predicate) {
    st.selected = new Set(st.items.map((q, i) => (predicate(q) ? i : -1)).filter((i) => i >= 0));
    renderPicker();
  }

  async function explain() {
    ctx.clearError();
    const rows = [...st.selected].sort((a, b) => a - b);
    if (!rows.length) throw new ApiError(0, "bad_input", "select at least one held-out example");
    const members = rows.map((i) => st.items[i]);
    const missing = members.find((q) => !q.example);
    if (missing) throw new ApiError(0, "bad_input", `held-out example ${missing.id} has no example JSON to post`);
    const body = { examples: members.map((q) => q.example), aggregate: $("set-aggregate").value,
      k: Number($("set-k").value) || 10, member_scores: true };
    if ($("set-true-labels").checked) body.labels = members.map((q) => (q.label === undefined ? null : q.label));
    const metric = $("set-metric").value;
    if (metric && metric !== "loss") body.metric = metric;
    const normalize = $("set-normalize").value;
    if (normalize !== "none") body.normalize = normalize;
    const seq = ++st.seq;
    $("set-results").setAttribute("aria-busy", "true");
    try {
      const t0 = performance.now();
      const answer = await api.influence(body);
      if (seq !== st.seq) return;
      st.answer = answer;
      st.body = body;
      st.memberIds = members.map((q) => q.id);
      st.members = members;
      st.roundTrip = performance.now() - t0;
      renderAnswer();
    } finally {
      if (seq === st.seq) $("set-results").removeAttribute("aria-busy");
    }
  }

  // The members a hit affects most, in its direction (proponents: the largest positive member scores).
  function topMembers(hit, sign) {
    const scores = hit.member_scores || [];
    return scores.map((s, m) => [s, m]).filter(([s]) => sign * s > 0).sort((a, b) => sign * (b[0] - a[0]))
      .slice(0, TOP_MEMBERS);
  }

  function membersCell(hit, sign) {
    const top = topMembers(hit, sign);
    if (!top.length) return null;
    const share = (s) => (hit.score ? `${Math.round((100 * s) / hit.score)}%` : "");
    return h("div", { class: "affects", "data-members": top.map(([, m]) => st.memberIds[m]).join(",") },
      h("span", { class: "muted small", text: "affects most " }),
      top.map(([s, m]) => {
        const q = st.members[m];
        return h("span", { class: "member-chip", title: `${q.id}: ${fmtScore(s)} (${share(s)} of the score)` },
          exampleVisual(q.display || {}, { size: "xs", lines: 1 }),
          h("span", { class: "mono small", text: `${q.id} ${share(s)}` }));
      }));
  }

  function renderAnswer() {
    const res = st.answer;
    const box = clear($("set-results"));
    box.dataset.members = st.memberIds.join(",");
    box.dataset.aggregate = res.set.aggregate;
    const facts = h("dl", { class: "facts" });
    const fact = (k, ...v) => facts.append(h("dt", { text: k }), h("dd", {}, ...v));
    const size = res.set.size;
    const wrongCount = st.members.filter(wrong).length;
    fact("set", h("span", { text: `${fmtInt(size)} held-out example${size === 1 ? "" : "s"}` }),
      h("span", { class: "muted", text: ` · ${wrongCount} misclassified · labels: ${st.body.labels ? "the held-out labels" : "the model's predictions"}` }));
    const metricName = (res.metric?.name || "loss").replace(/_/g, " ");
    fact("ranked by", h("span", { text: `influence on the ${res.set.aggregate} of the members' ${metricName}` }),
      res.normalize !== "none" ? h("span", { class: "muted", text: ` · normalised (${res.normalize})` }) : null);
    const last = res.query?.checkpoints?.[res.query.checkpoints.length - 1];
    if (last) fact(`set ${metricName} (last checkpoint)`, h("span", { class: "mono", text: fmtScore(last.metric) }));
    fact("scores", h("span", { class: res.exact ? "exact" : "approx", text: res.exact ? "exact TracIn" : "index estimates" }),
      res.rerank ? h("span", { class: "muted", text: ` (re-ranked: ${fmtInt(res.rerank.candidates)} candidates)` }) : null);
    fact("took", h("span", { class: "mono", text: `${res.took_ms.toFixed(1)} ms` }),
      h("span", { class: "muted", text: ` server · ${st.roundTrip.toFixed(0)} ms round trip` }));
    const exportBox = h("span", { class: "export" }, "export ",
      h("button", { type: "button", class: "secondary small-button", id: "set-export-csv", text: "CSV",
        onclick: () => download("csv") }),
      h("button", { type: "button", class: "secondary small-button", id: "set-export-json", text: "JSON",
        onclick: () => download("json") }));
    box.append(h("div", { class: "panel query-summary no-preview", id: "set-summary" },
      h("div", { class: "facts-wrap" }, facts), exportBox));
    const open = (id) => ctx.navigate(`#/explain/train/${encodeURIComponent(id)}`);
    const column = (kind, hits, title, subtitle, sign) => h("div", { class: `panel hits-panel ${kind}`, id: `set-${kind}` },
      h("div", { class: "panel-head" }, h("h2", {}, title, h("span", { class: "count", text: String(hits.length) })),
        h("span", { class: "muted small", text: subtitle })),
      h("div", { class: "muted small summary-line" }, `labels: ${labelSummary(hits, ctx.labelName) || "–"}`,
        hits.some((x) => typeof x.display?.flipped === "boolean")
          ? ` · flipped: ${hits.filter((x) => x.display?.flipped === true).length}/${hits.length}` : ""),
      hitList(hits, { kind, labelName: ctx.labelName, onOpen: open, textTask: document.body.dataset.task === "text",
        extra: (hit) => membersCell(hit, sign) }));
    const lower = res.metric?.higher_is_better ? "raised" : "lowered";
    const upper = res.metric?.higher_is_better ? "lowered" : "raised";
    box.append(h("div", { class: "hits-cols" },
      column("proponents", res.proponents, "Helped the set", `${lower} the set's ${metricName} · score > 0`, 1),
      column("opponents", res.opponents, "Hurt the set", `${upper} the set's ${metricName} · score < 0`, -1)));
    box.append(h("div", { class: "panel muted small" },
      "Each score is the sum (mean) of the training example's exact scores against the members; ",
      "“affects most” lists the members with the largest share of it; “layers” splits it by traced block."));
  }

  function exportRows() {
    const res = st.answer;
    const blocks = [...new Set([...res.proponents, ...res.opponents].flatMap((x) => Object.keys(x.blocks || {})))];
    const rows = [];
    for (const [side, sign] of [["proponents", 1], ["opponents", -1]]) {
      res[side].forEach((hit, i) => {
        const row = { side, rank: i + 1, id: hit.id, label: hit.label, label_name: hit.label_name, score: hit.score,
          raw_score: hit.raw_score ?? "", self_influence: hit.self_influence ?? "",
          flipped: typeof hit.display?.flipped === "boolean" ? hit.display.flipped : "",
          top_members: topMembers(hit, sign).map(([, m]) => st.memberIds[m]).join(" ") };
        for (const b of blocks) row[`block.${b}`] = hit.blocks?.[b] ?? "";
        st.memberIds.forEach((id, m) => { row[`member.${id}`] = hit.member_scores?.[m] ?? ""; });
        rows.push(row);
      });
    }
    return rows;
  }

  function download(format) {
    const res = st.answer;
    let text;
    let type;
    if (format === "json") {
      text = JSON.stringify({ members: st.memberIds, request: { ...st.body, examples: undefined }, answer: res }, null, 1);
      type = "application/json";
    } else {
      const rows = exportRows();
      const columns = Object.keys(rows[0] || { side: "" });
      const cell = (v) => {
        const s = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
        return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
      };
      text = [columns.join(","), ...rows.map((r) => columns.map((c) => cell(r[c])).join(","))].join("\n") + "\n";
      type = "text/csv";
    }
    const filename = `influence-set-${res.set.size}-${res.set.aggregate}.${format}`;
    downloadBlob(new Blob([text], { type }), filename);
  }

  function init() {
    $("set-misclassified").addEventListener("click", () => select(wrong));
    $("set-class-add").addEventListener("click", () => {
      const c = Number($("set-class").value);
      select((q) => q.label === c);
    });
    $("set-all").addEventListener("click", () => select(() => true));
    $("set-clear").addEventListener("click", () => select(() => false));
    $("set-run").addEventListener("click", () => ctx.guarded(explain, "explain set"));
  }

  return { init, load, reset: () => { st.items = null; } };
}
