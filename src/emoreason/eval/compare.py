"""Two runs over the same clips: which clips flipped, and how far each metric moved with its uncertainty.

``compare_runs(report_a, report_b)`` takes two ``report.json`` dicts (with their ``clips``), pairs the clips by id,
and for each strategy both runs have gives: the clips that went right -> wrong and wrong -> right, McNemar's test for
accuracy, and for every metric with an interval in both runs the paired difference B - A with its paired-bootstrap
interval (:mod:`emoreason.eval.intervals`). ``emoreason report compare RUN_A RUN_B`` writes it as ``compare.json``
and the same page as a run's (``report.html``) with a flip filter.
"""

from __future__ import annotations

import json
from pathlib import Path

from .clips import STATISTICS, clip_columns
from .html_report import write_html
from .intervals import DEFAULT_DRAWS, DEFAULT_LEVEL, mcnemar, paired_difference
from .report import finite_json


class CompareError(ValueError):
    pass


def load_report(run: str | Path) -> tuple[dict, Path]:
    """A run's report.json (``run`` is its folder or the file itself) and the folder."""
    path = Path(run)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise CompareError(f"no report.json at {path}")
    return json.loads(path.read_text(encoding="utf-8")), path.parent


def compare_runs(report_a: dict, report_b: dict, *, labels: tuple[str, str] = ("A", "B"), paths=("", ""),
                 draws: int = DEFAULT_DRAWS, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    for name, report in zip(labels, (report_a, report_b)):
        if not report.get("clips"):
            raise CompareError(f"run {name} has no per-clip data (report.json without `clips`: "
                               f"{(report.get('bootstrap') or {}).get('skipped', 'written by an older version')})")
    if list(report_a.get("labels", [])) != list(report_b.get("labels", [])):
        raise CompareError(f"the runs use different label sets: {report_a.get('labels')} vs {report_b.get('labels')}")
    ids_a = [c["id"] for c in report_a["clips"]]
    by_id_b = {c["id"]: c for c in report_b["clips"]}
    if set(ids_a) != set(by_id_b):
        only_a, only_b = sorted(set(ids_a) - set(by_id_b)), sorted(set(by_id_b) - set(ids_a))
        raise CompareError(f"the runs are not over the same clips ({len(only_a)} only in {labels[0]}, e.g. "
                           f"{only_a[:1]}; {len(only_b)} only in {labels[1]}, e.g. {only_b[:1]})")
    clips_b = [by_id_b[i] for i in ids_a]
    common = [s for s in report_a["strategies"] if s in report_b["strategies"]]
    if not common:
        raise CompareError(f"no strategy in both runs ({list(report_a['strategies'])} vs "
                           f"{list(report_b['strategies'])})")
    n, n_labels = len(ids_a), len(report_a["labels"])
    strategies = {}
    for name in common:
        sa, sb = report_a["strategies"][name], report_b["strategies"][name]
        cols_a = clip_columns(report_a["clips"], name, n_labels)
        cols_b = clip_columns(clips_b, name, n_labels)
        both = [m for m in STATISTICS if m in sa.get("intervals", {}) and m in sb.get("intervals", {})]
        differences = {metric: paired_difference(STATISTICS[metric], cols_a, cols_b, n, draws=draws, seed=seed,
                                                 level=level) for metric in both}
        test = mcnemar(cols_a["correct"].astype(bool), cols_b["correct"].astype(bool))
        if "classification.accuracy" in differences:
            differences["classification.accuracy"].update(test="McNemar", p_value=test["p_value"],
                                                          bootstrap_p_value=differences["classification.accuracy"]
                                                          ["p_value"])
        right_a, right_b = cols_a["correct"].astype(bool), cols_b["correct"].astype(bool)
        strategies[name] = {
            "differences": differences, "mcnemar": test,
            "flips": {"right_to_wrong": [i for i, a, b in zip(ids_a, right_a, right_b) if a and not b],
                      "wrong_to_right": [i for i, a, b in zip(ids_a, right_a, right_b) if b and not a]},
            "intervals_a": sa.get("intervals", {}), "intervals_b": sb.get("intervals", {}),
            "metrics": sb.get("metrics", {}), "tokens": sb.get("tokens", {})}
    merged = [dict(a, strategies={k: v for k, v in a["strategies"].items() if k in common},
                   strategies_b={k: v for k, v in b["strategies"].items() if k in common})
              for a, b in zip(report_a["clips"], clips_b)]
    return {"mode": "compare", "suite": report_a.get("suite"), "labels": report_a["labels"], "items": n,
            "runs": [{"label": label, "model": r.get("model"), "suite": r.get("suite"), "path": str(p)}
                     for label, r, p in zip(labels, (report_a, report_b), paths)],
            "bootstrap": {"method": "paired percentile bootstrap, clips resampled with replacement (the same clips "
                                    "for both runs)", "draws": draws, "level": level, "seed": seed, "n": n},
            "strategies": strategies, "clips": merged}


def write_compare(run_a: str | Path, run_b: str | Path, out_dir: str | Path, *, labels: tuple[str, str] | None = None,
                  draws: int = DEFAULT_DRAWS, seed: int = 0, embed_audio: bool = False) -> dict:
    """Compare two run folders; write ``compare.json``, ``compare.md`` and ``report.html`` under ``out_dir``."""
    report_a, dir_a = load_report(run_a)
    report_b, dir_b = load_report(run_b)
    labels = labels or (dir_a.name or "A", dir_b.name or "B")
    if labels[0] == labels[1]:
        labels = (f"A ({labels[0]})", f"B ({labels[1]})")
    result = compare_runs(report_a, report_b, labels=labels, paths=(dir_a, dir_b), draws=draws, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _rebase_audio(result["clips"], dir_a, out)
    (out / "compare.json").write_text(json.dumps(finite_json(result), indent=2, ensure_ascii=False, allow_nan=False),
                                      encoding="utf-8")
    (out / "compare.md").write_text(markdown(result), encoding="utf-8")
    result["files"] = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"),
                       "html": str(write_html(finite_json(result), out, embed_audio=embed_audio))}
    return result


def _rebase_audio(clips: list[dict], run_dir: Path, out: Path) -> None:
    """Audio paths in a run's clips are relative to its folder: make them relative to the compare page's."""
    import os

    for clip in clips:
        audio = clip.get("audio") or ""
        if audio and not audio.startswith(("data:", "file:", "http:", "https:")):
            target = (run_dir / audio).resolve()
            try:
                clip["audio"] = Path(os.path.relpath(target, out.resolve())).as_posix()
            except ValueError:
                clip["audio"] = target.as_uri()


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}" if isinstance(value, float) else str(value)


def difference_rows(result: dict, metrics: tuple[str, ...] | None = None) -> list[list[str]]:
    """Table rows (strategy, metric, A, B, B - A, interval, p, test) of a comparison."""
    rows = []
    for name, s in result["strategies"].items():
        for metric, d in s["differences"].items():
            if metrics and metric not in metrics:
                continue
            digits = 1 if metric.startswith("tokens.") else 3
            plain = (lambda v: "-" if v is None else f"{v:.{digits}f}")
            rows.append([name, metric, plain(d["a"]), plain(d["b"]), _fmt(d["difference"], digits),
                         f"[{_fmt(d['low'], digits)}, {_fmt(d['high'], digits)}]",
                         "-" if d["p_value"] is None else f"{d['p_value']:.3f}", d["test"]])
    return rows


def markdown(result: dict) -> str:
    a, b = (r["label"] for r in result["runs"])
    boot = result["bootstrap"]
    lines = [f"# Compare {a} -> {b}: {result['suite']}", "",
             f"{result['items']} clips paired by id; differences are {b} - {a} with {int(boot['level'] * 100)}% "
             f"paired-bootstrap intervals ({boot['draws']} draws, seed {boot['seed']}); accuracy's p-value is "
             "McNemar's (exact binomial under 25 discordant clips), the others' the paired bootstrap's.", "",
             "| strategy | metric | " + a + " | " + b + " | B - A | 95% interval | p | test |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in difference_rows(result)]
    lines.append("")
    for name, s in result["strategies"].items():
        flips = s["flips"]
        lines += [f"## {name}: flipped clips", "",
                  f"- right -> wrong ({len(flips['right_to_wrong'])}): "
                  + (", ".join(f"`{i}`" for i in flips["right_to_wrong"]) or "none"),
                  f"- wrong -> right ({len(flips['wrong_to_right'])}): "
                  + (", ".join(f"`{i}`" for i in flips["wrong_to_right"]) or "none"), ""]
    return "\n".join(lines) + "\n"
