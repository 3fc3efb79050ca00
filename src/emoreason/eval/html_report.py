"""``report.html``: one self-contained page per run (or per pair of runs) to browse the evaluation clip by clip.

The page is the report's JSON inside a ``<script type="application/json">`` block (every ``<`` written as
``\\u003c``, so no text in it can close the block) and a script that builds the page with ``textContent`` only: a
transcript or rationale holding ``<script>`` or ``</td>`` shows as text. No network: CSS, JS and plots are inline;
audio is the clip's path relative to the page, or inlined (``embed_audio``). Filters count clips from the same
per-clip fields report.json holds (``clips[*]``), so a count on the page is the count report.json gives.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

# The headline metrics of the page's tables, in order: (dotted name, column title, better).
HEADLINE = (("classification.accuracy", "WA", "higher"), ("classification.balanced_accuracy", "UA", "higher"),
            ("classification.macro_f1", "macro F1", "higher"), ("distribution.js_divergence", "JS div", "lower"),
            ("calibration.ece", "ECE", "lower"), ("reasoning.format_validity", "format valid", "higher"),
            ("reasoning.cue_hallucination_rate", "cue halluc.", "lower"),
            ("tokens.total_per_item", "tok/item", "lower"))


def _page_data(report: dict, out: Path, embed_audio: bool) -> dict[str, Any]:
    data = {k: v for k, v in report.items() if k not in ("plots",)}
    plots = []
    for rel in report.get("plots", []):
        path = out / rel
        if path.is_file() and path.suffix == ".png":
            plots.append({"name": path.stem, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes())
                          .decode("ascii")})
    data["plots"] = plots
    data["headline"] = [list(h) for h in HEADLINE]
    if embed_audio:
        clips = []
        for clip in data.get("clips", []):
            path = out / str(clip.get("audio") or "")
            if clip.get("audio") and path.is_file():
                clip = dict(clip, audio="data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))
            clips.append(clip)
        data["clips"] = clips
    return data


def _json_for_script(data: Any) -> str:
    """JSON that cannot end the script block it sits in, nor start a comment or CDATA section."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(report: dict, out: Path | str = ".", *, embed_audio: bool = False, title: str | None = None) -> str:
    out = Path(out)
    data = _page_data(report, out, embed_audio)
    heading = title or (f"Compare: {report.get('suite', '')}" if report.get("mode") == "compare"
                        else f"Evaluation: {report.get('suite', '')}")
    escaped_title = (heading.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    return (_TEMPLATE.replace("__TITLE__", escaped_title)
            .replace("__CSS__", _CSS).replace("__JS__", _JS).replace("__DATA__", _json_for_script(data)))


def write_html(report: dict, out_dir: Path | str, *, embed_audio: bool = False, name: str = "report.html") -> Path:
    out = Path(out_dir)
    path = out / name
    path.write_text(render(report, out, embed_audio=embed_audio), encoding="utf-8")
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; media-src data: file: *; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title><style>__CSS__</style></head>
<body><div id="app"><p>Loading the report...</p></div>
<script type="application/json" id="report-data">__DATA__</script>
<script>__JS__</script></body></html>
"""

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header,section.top{padding:10px 18px;background:#fff;border-bottom:1px solid #dde1e7}
h1{font-size:19px;margin:4px 0}h2{font-size:15px;margin:12px 0 6px}
.meta{color:#5b6472}.meta b{color:#1d2430}
table.metrics{border-collapse:collapse;margin:6px 0}table.metrics td,table.metrics th{border:1px solid #dde1e7;
padding:3px 7px;text-align:right;white-space:nowrap}table.metrics th{background:#eef1f5}
table.metrics td:first-child,table.metrics th:first-child{text-align:left}
.ci{color:#6a7380;font-size:11px}.sig{font-weight:600;color:#0b6b2f}.sigbad{font-weight:600;color:#a11d1d}
details.plots summary{font-weight:600;cursor:pointer;margin:8px 0}
.plots img{max-height:230px;margin:4px 8px 4px 0;border:1px solid #dde1e7;background:#fff}
.controls{position:sticky;top:0;z-index:2;background:#fff;padding:8px 18px;border-bottom:1px solid #cfd5de;
display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center}
.controls label{color:#5b6472}.controls select,.controls input{font:inherit;padding:2px 4px}
#count{font-weight:700;font-size:15px}
table.clips{border-collapse:collapse;width:100%;background:#fff}
table.clips>tbody>tr{border-bottom:1px solid #e4e7ec;content-visibility:auto;contain-intrinsic-size:auto 150px}
table.clips td{vertical-align:top;padding:6px 8px}table.clips th{position:sticky;top:44px;background:#eef1f5;
text-align:left;padding:4px 8px;z-index:1}
td.clip{width:220px}td.clip audio{width:210px;height:30px}
.id{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
.transcript{font-style:italic;margin-bottom:4px;white-space:pre-wrap}
.chip{display:inline-block;border-radius:9px;padding:0 7px;margin:1px 3px 1px 0;background:#eef1f5;font-size:11px}
.bars{display:grid;grid-template-columns:56px 1fr 1fr;gap:1px 4px;font-size:11px;min-width:210px}
.bar{height:9px;background:#e9ecf1;position:relative}.bar i{position:absolute;left:0;top:0;bottom:0}
.bar.ann i{background:#6b7fa8}.bar.mod i{background:#d4883a}.gold{font-weight:700}
.answer{margin:1px 0}.ok{color:#0b6b2f;font-weight:600}.bad{color:#a11d1d;font-weight:600}
.rationale{white-space:pre-wrap;font-size:12px;max-height:150px;overflow:auto;background:#fafbfc;
border:1px solid #eceff3;padding:4px}
mark.supported{background:#cdebd5}mark.contradicted{background:#f6c9c9}mark.unmeasured{background:#e8e3f3}
.claims .supported{background:#cdebd5}.claims .contradicted{background:#f6c9c9}.claims .unmeasured{background:#e8e3f3}
.flip-rw{background:#fff1f1}.flip-wr{background:#effaf2}
button{font:inherit}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const COMPARE = D.mode === "compare";
const PAGE = 100;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  if (attrs) for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "text") e.textContent = String(v); else if (k === "cls") e.className = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}
function fmt(v, d) { return (v === null || v === undefined || Number.isNaN(v)) ? "-" : (typeof v === "number" ?
  (Number.isInteger(v) && d === undefined ? String(v) : v.toFixed(d === undefined ? 3 : d)) : String(v)); }
function reported(s, name) {
  const [group, key] = name.split(".");
  const src = group === "tokens" ? (s.tokens || {}) : ((s.metrics || {})[group] || {});
  return src[key];
}
function metricCell(s, name) {
  const iv = (s.intervals || {})[name];
  const v = reported(s, name);
  const digits = name.startsWith("tokens.") ? 1 : 3;
  const td = el("td", null, fmt(v, digits));
  if (iv) { td.append(el("br"), el("span", {cls: "ci", text: "[" + fmt(iv.low, digits) + ", " +
    fmt(iv.high, digits) + "]"})); td.title = "95% bootstrap interval, n=" + iv.n + " clips"; }
  return td;
}
const strategyNames = Object.keys(D.strategies || {});
const clips = D.clips || [];

function header() {
  const h = el("header");
  h.append(el("h1", {text: COMPARE ? ("Compare " + D.runs[0].label + " -> " + D.runs[1].label + ": " + D.suite)
                                   : ("Evaluation: " + D.suite)}));
  if (COMPARE) {
    for (const r of D.runs) h.append(el("div", {cls: "meta"}, el("b", {text: r.label}), ": model ",
      el("b", {text: r.model}), ", run " + r.path));
  } else {
    h.append(el("div", {cls: "meta"}, "model ", el("b", {text: D.model}), " at " + D.endpoint + "; ",
      el("b", {text: String(D.items)}), " clips; strategies: " + strategyNames.join(", ")));
  }
  const b = D.bootstrap || {};
  h.append(el("div", {cls: "meta", text: b.skipped ? ("No intervals: " + b.skipped) :
    (((b.level || 0.95) * 100).toFixed(0) + "% intervals: " + (b.method || "bootstrap") + ", " + b.draws +
     " draws, seed " + b.seed + ", n = " + b.n + " clips" +
     (COMPARE ? "; differences are B - A on the same clips" : ""))}));
  return h;
}

function metricsTable() {
  const t = el("table", {cls: "metrics", id: "metrics"});
  const head = el("tr", null, el("th", {text: "strategy"}));
  for (const [, title] of D.headline) head.append(el("th", {text: title}));
  head.append(el("th", {text: "n"}));
  t.append(head);
  for (const name of strategyNames) {
    const s = D.strategies[name];
    const row = el("tr", null, el("td", {text: name}));
    for (const [metric] of D.headline) row.append(metricCell(s, metric));
    row.append(el("td", {text: String(D.items)}));
    t.append(row);
  }
  return t;
}

function compareTable() {
  const t = el("table", {cls: "metrics", id: "differences"});
  t.append(el("tr", null, ...["strategy", "metric", D.runs[0].label, D.runs[1].label, "B - A", "95% interval",
    "p", "test", "n"].map(x => el("th", {text: x}))));
  for (const name of strategyNames) {
    const diffs = D.strategies[name].differences || {};
    for (const [metric, title, better] of D.headline) {
      const d = diffs[metric];
      if (!d) continue;
      const digits = metric.startsWith("tokens.") ? 1 : 3;
      const sig = d.p_value !== null && d.p_value < 0.05;
      const good = (better === "higher") === (d.difference > 0);
      t.append(el("tr", null, el("td", {text: name}), el("td", {text: title}), el("td", {text: fmt(d.a, digits)}),
        el("td", {text: fmt(d.b, digits)}),
        el("td", {cls: sig ? (good ? "sig" : "sigbad") : null,
                  text: (d.difference > 0 ? "+" : "") + fmt(d.difference, digits)}),
        el("td", {text: "[" + fmt(d.low, digits) + ", " + fmt(d.high, digits) + "]"}),
        el("td", {text: fmt(d.p_value, 3)}), el("td", {text: d.test}), el("td", {text: String(d.n)})));
    }
    const mc = D.strategies[name].mcnemar;
    if (mc) t.append(el("tr", null, el("td", {text: name}), el("td", {colspan: "8", cls: "meta",
      text: "accuracy flips: " + mc.right_to_wrong + " right -> wrong, " + mc.wrong_to_right +
            " wrong -> right; McNemar p = " + fmt(mc.p_value, 3) + " (" + mc.method + ")"})));
  }
  return t;
}

const state = {strategy: strategyNames.includes("cot_greedy") ? "cot_greedy" : strategyNames[0], emotion: "",
  correct: "", bin: "", disagree: false, groups: {}, q: "", sort: "order", flip: "", shown: PAGE};

function select(id, label, options, value, onchange) {
  const s = el("select", {id});
  for (const [v, text] of options) {
    const o = el("option", {value: v, text});
    if (v === value) o.selected = true;
    s.append(o);
  }
  s.addEventListener("change", () => onchange(s.value));
  return el("label", null, label + " ", s);
}
function uniq(values) { return [...new Set(values.filter(v => v !== null && v !== undefined && v !== ""))].sort(); }

function answerOf(clip, run, strategy) {
  const s = (run === 1 ? clip.strategies_b : clip.strategies)[strategy];
  return s;
}
function isCorrect(s) { return !!(s && s.scores && s.scores.correct); }
function flipOf(clip) {
  const a = isCorrect(answerOf(clip, 0, state.strategy)), b = isCorrect(answerOf(clip, 1, state.strategy));
  return a && !b ? "right_to_wrong" : (!a && b ? "wrong_to_right" : "same");
}
function haystack(clip) {
  if (clip._hay === undefined) {
    const parts = [clip.id, clip.transcript, clip.speaker, clip.gender, clip.label];
    for (const run of COMPARE ? [clip.strategies, clip.strategies_b] : [clip.strategies])
      for (const s of Object.values(run)) parts.push(s.rationale, s.prediction);
    clip._hay = parts.filter(Boolean).join("\n").toLowerCase();
  }
  return clip._hay;
}
function matches(clip) {
  if (state.emotion && clip.label !== state.emotion) return false;
  if (state.bin && clip.ambiguity_bin !== state.bin) return false;
  for (const [f, v] of Object.entries(state.groups)) if (v && (clip.groups || {})[f] !== v) return false;
  if (state.correct) {
    const ok = isCorrect(answerOf(clip, COMPARE ? 1 : 0, state.strategy));
    if ((state.correct === "correct") !== ok) return false;
  }
  if (state.disagree) {
    const preds = new Set(Object.values(clip.strategies).map(s => s.prediction));
    if (preds.size < 2) return false;
  }
  if (COMPARE && state.flip) {
    const f = flipOf(clip);
    if (state.flip === "flipped" ? f === "same" : f !== state.flip) return false;
  }
  if (state.q && !haystack(clip).includes(state.q.toLowerCase())) return false;
  return true;
}
function score(clip, key) { return answerOf(clip, 0, state.strategy).scores[key]; }
const SORTS = {
  order: null,
  ambiguity: (a, b) => b.ambiguity - a.ambiguity,
  js: (a, b) => score(b, "js") - score(a, "js"),
  confidence: (a, b) => score(b, "confidence") - score(a, "confidence"),
  tokens: (a, b) => score(b, "tokens") - score(a, "tokens"),
  id: (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0),
};

function controls() {
  const c = el("div", {cls: "controls", id: "controls"});
  const refresh = () => { state.shown = PAGE; renderRows(); };
  c.append(select("f-strategy", COMPARE ? "strategy (flips, correct in B)" : "strategy", strategyNames.map(n => [n, n]),
    state.strategy, v => { state.strategy = v; refresh(); }));
  c.append(select("f-emotion", "emotion", [["", "all"], ...(D.labels || []).map(l => [l, l])], "",
                  v => { state.emotion = v; refresh(); }));
  c.append(select("f-correct", "answer", [["", "all"], ["correct", "correct"], ["wrong", "wrong"]], "",
                  v => { state.correct = v; refresh(); }));
  const bins = uniq(clips.map(x => x.ambiguity_bin));
  if (bins.length) c.append(select("f-bin", "ambiguity", [["", "all"], ...bins.map(b => [b, b])], "",
                                   v => { state.bin = v; refresh(); }));
  const fields = uniq(clips.flatMap(x => Object.keys(x.groups || {})));
  for (const f of fields) {
    const values = uniq(clips.map(x => (x.groups || {})[f])).map(v => [v, v]);
    c.append(select("f-group-" + f, f, [["", "all"], ...values], "", v => { state.groups[f] = v; refresh(); }));
  }
  if (strategyNames.length > 1) {
    const box = el("input", {type: "checkbox", id: "f-disagree"});
    box.addEventListener("change", () => { state.disagree = box.checked; refresh(); });
    c.append(el("label", null, box, " strategies disagree"));
  }
  if (COMPARE) c.append(select("f-flip", "flip", [["", "all"], ["flipped", "any flip"],
    ["right_to_wrong", "right -> wrong"], ["wrong_to_right", "wrong -> right"], ["same", "unchanged"]], "",
    v => { state.flip = v; refresh(); }));
  const q = el("input", {type: "search", id: "f-search", placeholder: "search transcript, rationale, id"});
  q.addEventListener("input", () => { state.q = q.value; refresh(); });
  c.append(q);
  c.append(select("f-sort", "sort", [["order", "run order"], ["ambiguity", "most ambiguous"], ["js", "JS divergence"],
    ["confidence", "confidence"], ["tokens", "tokens"], ["id", "id"]], "order", v => { state.sort = v; refresh(); }));
  c.append(el("span", null, el("span", {id: "count", text: "0"}), " of " + clips.length + " clips"));
  return c;
}

function bars(clip, s, label) {
  const g = el("div", {cls: "bars"});
  g.append(el("span"), el("span", {cls: "ci", text: "annotators"}), el("span", {cls: "ci", text: label}));
  const dist = (s && s.distribution) || {};
  for (const l of D.labels || []) {
    const a = (clip.reference || {})[l] || 0, m = dist[l] || 0;
    const ba = el("div", {cls: "bar ann", title: fmt(a, 2)}, el("i")); ba.firstChild.style.width = (100 * a) + "%";
    const bm = el("div", {cls: "bar mod", title: fmt(m, 2)}, el("i")); bm.firstChild.style.width = (100 * m) + "%";
    g.append(el("span", {cls: l === clip.label ? "gold" : null, text: l}), ba, bm);
  }
  return g;
}

function markRationale(text, claims) {
  const box = el("div", {cls: "rationale"});
  text = text || "";
  const spans = [];
  // The reader may hand back a clause in lower case; case-folding that changes lengths forbids the search.
  const folded = text.toLowerCase().length === text.length ? text.toLowerCase() : text;
  for (const c of claims || []) {
    if (!c.clause) continue;
    const at = folded.indexOf(folded === text ? c.clause : c.clause.toLowerCase());
    const end = at + c.clause.length;
    if (at >= 0 && !spans.some(s => at < s[1] && end > s[0])) spans.push([at, end, c]);
  }
  spans.sort((a, b) => a[0] - b[0]);
  let pos = 0;
  for (const [start, end, c] of spans) {
    box.append(text.slice(pos, start));
    box.append(el("mark", {cls: c.verdict, text: text.slice(start, end),
      title: c.cue + ": " + (c.negated ? "not " : "") + c.level + " -> " + c.verdict}));
    pos = end;
  }
  box.append(text.slice(pos));
  return box;
}
function claimList(claims, cues) {
  const d = el("div", {cls: "claims"});
  for (const c of claims || []) d.append(el("span", {cls: "chip " + c.verdict,
    text: c.cue + ": " + (c.negated ? "not " : "") + c.level + " (" + c.verdict +
          (cues && cues[c.cue] ? ", measured " + cues[c.cue] : "") + ")"}));
  return d;
}
function answers(clip, run, title) {
  const d = el("div");
  if (title) d.append(el("div", {cls: "ci", text: title}));
  const strategies = run === 1 ? clip.strategies_b : clip.strategies;
  for (const name of strategyNames) {
    const s = strategies[name];
    if (!s) continue;
    const ok = isCorrect(s);
    d.append(el("div", {cls: "answer"}, el("span", {cls: ok ? "ok" : "bad", text: ok ? "\u2713 " : "\u2717 "}),
      name + ": ", el("b", {text: s.prediction === null ? "(no answer)" : s.prediction}),
      el("span", {cls: "ci", text: " " + s.scores.tokens + " tok" + (s.judge !== null && s.judge !== undefined ?
        ", judge " + fmt(s.judge, 2) : "") + (s.failure ? ", failed: " + s.failure : "")})));
  }
  return d;
}

function row(clip) {
  const tr = el("tr", {"data-id": clip.id});
  if (COMPARE) {
    const f = flipOf(clip);
    if (f !== "same") tr.className = f === "right_to_wrong" ? "flip-rw" : "flip-wr";
  }
  const audio = el("audio", {controls: "", preload: "none", src: clip.audio});
  tr.append(el("td", {cls: "clip"}, el("div", {cls: "id", text: clip.id}), audio,
    el("div", {cls: "meta",
               text: fmt(clip.duration, 2) + " s; speaker " + (clip.speaker || "-") + ", " + (clip.gender || "-")}),
    el("div", {cls: "meta", text: "label " + clip.label + "; ambiguity " + fmt(clip.ambiguity, 2) + " bits" +
      (clip.ambiguity_bin ? " (" + clip.ambiguity_bin + ")" : "")})));
  const cues = el("div");
  for (const [k, v] of Object.entries(clip.cues || {}))
    cues.append(el("span", {cls: "chip", text: k.replace("_level", "") + ": " + v}));
  tr.append(el("td", null, el("div", {cls: "transcript", text: clip.transcript || ""}), cues));
  const sa = answerOf(clip, 0, state.strategy);
  const barCell = el("td", null, bars(clip, sa, COMPARE ? D.runs[0].label : state.strategy));
  if (COMPARE) barCell.append(bars(clip, answerOf(clip, 1, state.strategy), D.runs[1].label));
  tr.append(barCell);
  const ans = el("td", null, answers(clip, 0, COMPARE ? D.runs[0].label : null));
  if (COMPARE) ans.append(answers(clip, 1, D.runs[1].label));
  tr.append(ans);
  const rat = el("td");
  for (const run of COMPARE ? [0, 1] : [0]) {
    const s = answerOf(clip, run, state.strategy);
    if (!s) continue;
    if (COMPARE) rat.append(el("div", {cls: "ci", text: D.runs[run].label}));
    rat.append(markRationale(s.rationale, s.claims), claimList(s.claims, clip.cues));
  }
  tr.append(rat);
  return tr;
}

let body, more;
function renderRows() {
  const started = performance.now();
  let list = clips.filter(matches);
  if (SORTS[state.sort]) list = list.slice().sort(SORTS[state.sort]);
  document.getElementById("count").textContent = String(list.length);
  const frag = document.createDocumentFragment();
  for (const clip of list.slice(0, state.shown)) frag.append(row(clip));
  body.replaceChildren(frag);
  more.hidden = list.length <= state.shown;
  more.textContent = "show " + Math.min(PAGE, list.length - state.shown) + " more of " + (list.length - state.shown);
  window.__lastRenderMs = performance.now() - started;
}

function main() {
  const app = document.getElementById("app");
  const top = el("section", {cls: "top"});
  top.append(el("h2", {text: COMPARE ? "Paired differences" : "Headline metrics (95% interval below each)"}),
             COMPARE ? compareTable() : metricsTable());
  if ((D.plots || []).length) {
    const p = el("details", {cls: "plots", id: "plots"}, el("summary", {text: "Plots (" + D.plots.length + ")"}));
    for (const plot of D.plots) p.append(el("img", {src: plot.src, alt: plot.name, title: plot.name}));
    top.append(p);
  }
  const table = el("table", {cls: "clips", id: "clips"});
  table.append(el("thead", null, el("tr", null, ...["clip", "transcript and measured cues", "distributions",
    "answers", "rationale (cue claims: supported / contradicted / unmeasured)"].map(x => el("th", {text: x})))));
  body = el("tbody");
  table.append(body);
  more = el("button", {id: "more", type: "button"});
  more.addEventListener("click", () => { state.shown += PAGE; renderRows(); });
  app.replaceChildren(header(), top, controls(), table, more);
  renderRows();
  window.__reportReadyMs = performance.now();
  // Interactive: the first frame with the rows laid out and painted has gone by (after the next animation frame).
  requestAnimationFrame(() => setTimeout(() => {
    window.__reportInteractiveMs = performance.now();
    document.body.dataset.ready = "1";
  }, 0));
}
main();
"""
