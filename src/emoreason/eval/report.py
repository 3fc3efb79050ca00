"""Reports: ``report.json`` (everything), ``report.md`` (the tables a reader wants), ``report.html`` (the run clip by
clip, :mod:`emoreason.eval.html_report`) and PNG plots (matplotlib Agg): accuracy and JS divergence vs total tokens
spent per strategy (prompt + completion, verifier calls and re-sent turns included) with their 95% intervals,
confusion matrices, reliability diagrams, and metrics by ambiguity bin.

Every metric the clip columns cover (:data:`emoreason.eval.clips.STATISTICS`) gets a bootstrap interval and its n
(``strategies.<name>.intervals``; ``bootstrap`` says how), read from the run's predictions and records.

``report.json`` is strict JSON: a non-finite number anywhere in it is written as ``null`` (and listed under
``non_finite``), never as a bare ``NaN`` that JSON readers refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .clips import attach  # noqa: E402
from .html_report import write_html  # noqa: E402
from .intervals import DEFAULT_DRAWS  # noqa: E402


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_tradeoff(strategies: dict, out: Path) -> list[Path]:
    paths = []
    for metric, group, key, better in (("accuracy", "classification", "accuracy", "higher"),
                                       ("js_divergence", "distribution", "js_divergence", "lower")):
        points = [(s["tokens"]["total_per_item"], s["metrics"].get(group, {}).get(key), name,
                   s.get("intervals", {}).get(f"{group}.{key}"))
                  for name, s in strategies.items() if s["metrics"].get(group, {}).get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        markers = "osD^vP*X"
        for i, (x, y, name, interval) in enumerate(points):  # a legend, not annotations: strategies share budgets
            yerr = None
            if interval and interval.get("low") is not None:  # the 95% bootstrap interval, clips resampled
                yerr = [[max(0.0, y - interval["low"])], [max(0.0, interval["high"] - y)]]
            ax.errorbar(x, y, yerr=yerr, label=name, marker=markers[i % len(markers)], markersize=7, capsize=4,
                        linestyle="none")
        ax.legend(fontsize=7)
        ax.set_xlabel("total tokens per item (prompt + completion, verifier calls included)")
        ax.set_ylabel(f"{metric} ({better} is better)")
        ax.set_title(f"{metric} vs tokens spent (bars: 95% interval)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{metric}_vs_tokens.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_token_budget(strategies: dict, out: Path) -> Path | None:
    """Tokens per item by strategy, stacked: the strategy's own prompt and completion tokens, and its verifier's."""
    names = list(strategies)
    if not names:
        return None
    tok = [strategies[n]["tokens"] for n in names]

    def per_item(key):
        return np.array([float(t.get(key, 0.0)) for t in tok])

    # The verifier's tokens are inside the prompt and completion counts: split out, the bars add up to the total.
    parts = {"prompt": per_item("prompt_per_item") - per_item("verifier_prompt_per_item"),
             "completion": per_item("completion_per_item") - per_item("verifier_completion_per_item"),
             "verifier (prompt + completion)": per_item("verifier_per_item")}
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 4))
    bottom = np.zeros(len(names))
    for label, values in parts.items():
        ax.bar(names, values, bottom=bottom, label=label)
        bottom += values
    ax.set_ylabel("tokens per item")
    ax.set_title("compute per strategy (total = prompt + completion)")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "tokens_by_strategy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(name: str, classification: dict, out: Path) -> Path:
    matrix = np.asarray(classification["confusion_matrix"], dtype=float)
    labels = classification["labels"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(matrix.shape[1]), labels + ["invalid"], rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), labels)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, int(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"confusion: {name}")
    fig.tight_layout()
    path = out / f"confusion_{_safe(name)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(strategies: dict, out: Path) -> Path | None:
    tables = {n: s["metrics"]["calibration"]["reliability"] for n, s in strategies.items()
              if "calibration" in s["metrics"]}
    if not tables:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for name, table in tables.items():
        rows = [r for r in table if r["count"]]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
    ax.set_xlabel("confidence (top share)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "reliability.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ambiguity(strategies: dict, out: Path) -> Path | None:
    data = {n: s["metrics"]["ambiguity"] for n, s in strategies.items() if "ambiguity" in s["metrics"]}
    if not data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, amb in data.items():
        order = amb["bin_order"]
        axes[0].plot(order, [amb["by_group"][b]["accuracy"] for b in order], marker="o", label=name)
        axes[1].plot(order, [amb["by_group"][b]["js_divergence"] for b in order], marker="o", label=name)
    axes[0].set_ylabel("accuracy")
    axes[1].set_ylabel("JS divergence")
    for ax in axes:
        ax.set_xlabel("annotator ambiguity (vote entropy bin)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "metrics_by_ambiguity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _with_interval(strategy: dict, name: str, value: Any, digits: int = 3) -> str:
    """A figure with its 95% interval, "0.781 [0.672, 0.875]", or the figure alone when it has none."""
    interval = strategy.get("intervals", {}).get(name)
    text = _fmt(value) if digits == 3 else ("-" if value is None else f"{value:.{digits}f}")
    if not interval or interval.get("low") is None:
        return text
    return f"{text} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def _interval_cell(strategy: dict, name: str, interval: dict) -> str:
    text = f"{name} {_with_interval(strategy, name, interval['estimate'], 1 if name.startswith('tokens.') else 3)}"
    units = interval.get("denominator") or {}
    return text + "".join(f" ({count} {unit})" for unit, count in units.items())


def interval_lines(report: dict) -> list[str]:
    """What the intervals are, or why there are none."""
    boot = report.get("bootstrap") or {}
    if not boot:
        return []
    if "skipped" in boot:
        return [f"No intervals: {boot['skipped']}.", ""]
    return [f"Brackets: {int(round(boot['level'] * 100))}% intervals ({boot['method']}, {boot['draws']} draws, seed "
            f"{boot['seed']}), n = {boot['n']} clips.", ""]


def markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report['suite']}", "",
             f"Model `{report['model']}` at `{report['endpoint']}`, {report['items']} records "
             f"({report['records_path']}).", ""]
    if report.get("skipped_records"):
        lines += [f"Records left out before evaluation: {report['skipped_records']}", ""]
    lines += [f"Seed {report.get('seed', 0)}; groups and ambiguity bins with fewer than "
              f"{report.get('min_group_count', '-')} items are listed but left out of gaps (bins: merged).", ""]
    head = ["strategy", "WA", "UA", "macro F1", "JS div", "ECE", "format valid", "answered", "prompt tok/item",
            "completion tok/item", "total tok/item", "requests/item", "failed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in report["strategies"].items():
        m = s["metrics"]
        cls, dist, cal = m.get("classification", {}), m.get("distribution", {}), m.get("calibration", {})
        tok = s["tokens"]
        lines.append("| " + " | ".join([
            name, _with_interval(s, "classification.accuracy", cls.get("accuracy")),
            _with_interval(s, "classification.balanced_accuracy", cls.get("balanced_accuracy")),
            _with_interval(s, "classification.macro_f1", cls.get("macro_f1")),
            _with_interval(s, "distribution.js_divergence", dist.get("js_divergence")),
            _with_interval(s, "calibration.ece", cal.get("ece")),
            _with_interval(s, "reasoning.format_validity", m.get("reasoning", {}).get("format_validity")),
            _fmt(tok["answered"]), _fmt(tok["prompt_per_item"]), _fmt(tok["completion_per_item"]),
            _fmt(tok["total_per_item"]), _fmt(tok["requests_per_item"]), str(len(s["failures"])),
        ]) + " |")
    lines += ["", "Macro F1 averages over the suite's label set. Format valid: the final answer came in the format "
              "the strategy asked for (direct: the label; the others: reasoning then answer). Tokens: every request "
              "of the strategy (verifier calls and re-sent turns included); the judge metric's own calls are in "
              "report.json (`judge_metric_total`)."]
    lines.append("")
    lines += interval_lines(report)
    for name, s in report["strategies"].items():
        m = s["metrics"]
        lines += [f"## {name}", ""]
        if "multilabel" in m:
            lines.append(f"- multi-label F1 (1/C rule): micro {_fmt(m['multilabel']['micro_f1'])}, "
                         f"macro {_fmt(m['multilabel']['macro_f1'])}")
        if "distribution" in m:
            d = m["distribution"]
            lines.append(f"- distribution: JS {_fmt(d['js_divergence'])}, KL {_fmt(d['kl_divergence'])}, "
                         f"Bhattacharyya {_fmt(d['bhattacharyya'])}, R^2 {_fmt(d['r2'])}")
        if "calibration" in m:
            c = m["calibration"]
            lines.append(f"- calibration: Brier {_fmt(c['brier'])}, soft Brier {_fmt(c.get('soft_brier'))}, "
                         f"ECE {_fmt(c['ece'])}")
        if "ambiguity" in m:
            amb = m["ambiguity"]
            cells = ", ".join(f"{b}: acc {_fmt(amb['by_group'][b]['accuracy'])} / JS "
                              f"{_fmt(amb['by_group'][b]['js_divergence'])} (n={amb['by_group'][b]['count']}, "
                              f"entropy {_fmt(amb['by_group'][b]['entropy_range'][0])}-"
                              f"{_fmt(amb['by_group'][b]['entropy_range'][1])} bits)"
                              for b in amb["bin_order"])
            binning = amb.get("binning", {})
            lines.append(f"- by ambiguity ({len(amb['bin_order'])} equal-count bins of vote entropy, "
                         f"{binning.get('requested_bins', '-')} requested, min n {binning.get('min_count', '-')}): "
                         f"{cells}")
        for field_name, g in (m.get("groups") or {}).items():
            left_out = [k for k, v in g["by_group"].items() if not v.get("in_gap", True)]
            note = f"; {len(left_out)} group(s) under n={g.get('min_count')} left out" if left_out else ""
            lines.append(f"- by {field_name}: accuracy gap {_fmt(g['accuracy_gap'])} over {g.get('groups_in_gap')} "
                         f"group(s) (worst {g['worst_group']}, best {g['best_group']}{note})")
        if "reasoning" in m:
            r = m["reasoning"]
            lines.append(f"- reasoning: format validity {_fmt(r['format_validity'])}, consistency "
                         f"{_fmt(r['consistency'])}, cue hallucination rate {_fmt(r['cue_hallucination_rate'])} "
                         f"({r['cue_claims']} checked claims), sample validity {_fmt(r['sample_validity'])}")
        if s.get("intervals"):
            lines.append(f"- 95% intervals (n={next(iter(s['intervals'].values()))['n']} clips): "
                         + ", ".join(_interval_cell(s, k, v) for k, v in s["intervals"].items()))
        if s.get("notes"):
            lines.append(f"- {len(s['notes'])} item(s) with fallbacks, e.g. `{next(iter(s['notes']))}`: "
                         f"{next(iter(s['notes'].values()))[0]}")
        if "judge" in m and "skipped" not in m["judge"]:
            lines.append(f"- judge groundedness: {_fmt(m['judge']['groundedness'])} ({m['judge']['scored']} scored)")
        if s["failures"]:
            lines.append(f"- **{len(s['failures'])} failed item(s)** (counted as invalid):")
            lines += [f"  - `{f['record_id']}`: {f['failure']}" for f in s["failures"][:20]]
            if len(s["failures"]) > 20:
                lines.append(f"  - ... {len(s['failures']) - 20} more in report.json")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def finite_json(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every non-finite float replaced by None (their paths appended to ``found``)."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path or "/")
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}/{k}", found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}/{i}", found) for i, v in enumerate(value)]
    return value


def write_report(report: dict, out_dir: str | Path, *, embed_audio: bool = False,
                 draws: int = DEFAULT_DRAWS) -> dict[str, Path]:
    """Write report.json, report.md, report.html and plots/ under ``out_dir``; the run's clips and intervals come
    from its ``predictions/`` and records file (:func:`emoreason.eval.clips.attach`)."""
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    attach(report, out, draws=draws)
    plots = plot_tradeoff(report["strategies"], plots_dir)
    for name, s in report["strategies"].items():
        if "classification" in s["metrics"]:
            plots.append(plot_confusion(name, s["metrics"]["classification"], plots_dir))
    plots += [p for p in (plot_reliability(report["strategies"], plots_dir),
                          plot_ambiguity(report["strategies"], plots_dir),
                          plot_token_budget(report["strategies"], plots_dir)) if p is not None]
    report["plots"] = [str(p.relative_to(out)) for p in plots]
    json_path = out / "report.json"
    found: list[str] = []
    clean = finite_json(report, found=found)
    if found:
        clean["non_finite"] = found
    json_path.write_text(json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(markdown(report), encoding="utf-8")
    html_path = write_html(clean, out, embed_audio=embed_audio)
    return {"json": json_path, "markdown": md_path, "html": html_path, "plots": plots_dir}
