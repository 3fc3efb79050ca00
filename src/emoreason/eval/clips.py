"""The run clip by clip: what report.json's ``clips`` holds, and the per-clip score columns the intervals resample.

Built from the run's own files (``predictions/<strategy>.jsonl`` and the records file) through the metrics' own
inputs (:class:`emoreason.eval.metrics.MetricInputs`), the metric modules' own row functions and the data layer's
readers (``ground``, ``argued_emotion``: what the reasoning metric calls), so a clip's
"correct", its JS divergence or its ambiguity bin are the values the metrics averaged. Each clip's rationale is read
by :func:`emoreason.data.cues.ground`, the reader the datagen filter, the ``cue_grounding`` reward and the reasoning
metric use: a claim marked "contradicted" in the page is one those three count as contradicted.

:data:`STATISTICS` names each metric the bootstrap covers and how it follows from the columns; ``attach`` writes an
interval only for the metrics whose full-sample statistic reproduces the metric module's figure.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..data.cues import argued_emotion, ground, measured_levels
from ..data.labels import entropy
from ..data.response_format import parse_response
from ..data.schema import EmotionRecord, RecordError, iter_records
from .intervals import DEFAULT_DRAWS, DEFAULT_LEVEL, Columns, Statistic, bootstrap_interval, resample_counts
from .metrics import (DEFAULT_MIN_GROUP_COUNT, MetricInputs, ambiguity_bin_names, full_distribution, item_format_valid,
                      load_metric, quantile_bins)
from .strategies import ItemResult

logger = logging.getLogger(__name__)
ECE_BINS = 10  # the calibration module's default
KL_EPSILON = 1e-6  # the distribution module's default
ESTIMATE_TOLERANCE = 1e-9


def _module(name: str):
    """The Python module of a shipped metric (its row functions: one definition for the metric and the clips)."""
    return inspect.getmodule(type(load_metric(name)))


def item_scores(x: MetricInputs) -> list[dict[str, Any]]:
    """One dict of scalars per item: every per-clip quantity a reported metric averages or sums."""
    distribution, calibration = _module("distribution_agreement"), _module("calibration")
    from scipy.stats import entropy as relative_entropy

    labels = x.labels
    ref = np.array([labels.index(r) for r in x.references])
    pred = np.array(x.predicted_index)
    p, r = distribution.normalise(x.pred_cols), distribution.normalise(x.ref_cols)
    js = distribution.js_divergence(p, r)
    kl = relative_entropy(r, distribution.normalise(p + KL_EPSILON), axis=1)
    bc = np.sqrt(p * r).sum(axis=1)
    probs, soft = calibration.normalise(x.pred_cols), calibration.normalise(x.ref_cols)
    onehot = np.eye(probs.shape[1])[ref]
    brier = ((probs - onehot) ** 2).sum(axis=1)
    soft_brier = ((probs - soft) ** 2).sum(axis=1)
    answered = pred >= 0
    confidence = np.where(answered, probs[np.arange(len(ref)), np.where(answered, pred, 0)], probs.max(axis=1))
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    ece_bin = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, ECE_BINS - 1)
    rows = []
    for i, (item, record) in enumerate(zip(x.items, x.records)):
        row = {"ref": int(ref[i]), "pred": int(pred[i]), "correct": bool(pred[i] == ref[i]), "js": float(js[i]),
               "kl": float(kl[i]), "bhattacharyya": float(bc[i]), "brier": float(brier[i]),
               "soft_brier": float(soft_brier[i]), "confidence": float(confidence[i]), "ece_bin": int(ece_bin[i]),
               "format_valid": item_format_valid(item, labels), "answered": item.valid,
               "tokens": int(item.prompt_tokens + item.completion_tokens), "reasoned": False, "reasoned_valid": False,
               "consistent": False, "cue_claims": 0, "cue_contradicted": 0}
        if getattr(item, "style", "cot") == "cot":
            parsed = parse_response(item.final_text or "", strict=True, labels=labels)
            row["reasoned"] = True
            if parsed.valid:
                checked = ground(parsed.think, dict(record.cues or {}))
                row.update(reasoned_valid=True, consistent=argued_emotion(parsed.think) == parsed.answer,
                           cue_claims=checked.checked, cue_contradicted=len(checked.contradicted))
        rows.append(row)
    return rows


def columns(scores: list[dict[str, Any]], n_labels: int) -> dict[str, np.ndarray]:
    """The per-clip scores as arrays, with the one-hot matrices the class-wise statistics need."""
    col = {key: np.array([s[key] for s in scores], dtype=np.float64) for key in scores[0]} if scores else {}
    if not scores:
        return col
    ref, pred = col["ref"].astype(int), col["pred"].astype(int)
    eye = np.eye(n_labels)
    col["ref_onehot"] = eye[ref]
    col["pred_onehot"] = np.where((pred >= 0)[:, None], eye[np.where(pred >= 0, pred, 0)], 0.0)
    col["hit_onehot"] = col["ref_onehot"] * col["correct"][:, None]
    col["ece_terms"] = np.eye(ECE_BINS)[col["ece_bin"].astype(int)] * (col["correct"] - col["confidence"])[:, None]
    col["invalid"] = (pred < 0).astype(np.float64)
    return col


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean(key: str) -> Statistic:
    return lambda w, c: _divide(w @ c[key], w.sum(axis=1))


def _ratio(num: str, den: str) -> Statistic:
    return lambda w, c: _divide(w @ c[num], w @ c[den])


def _balanced_accuracy(w, c):
    hits, support = w @ c["hit_onehot"], w @ c["ref_onehot"]
    recall = _divide(hits, support)
    present = support > 0
    return _divide(np.where(present, recall, 0.0).sum(axis=1), present.sum(axis=1).astype(float))


def _f1(w, c):
    hits, support, predicted = w @ c["hit_onehot"], w @ c["ref_onehot"], w @ c["pred_onehot"]
    return np.nan_to_num(_divide(2 * hits, support + predicted)), support  # zero_division=0


def _macro_f1(w, c):
    return _f1(w, c)[0].mean(axis=1)


def _weighted_f1(w, c):
    f1, support = _f1(w, c)
    return _divide((f1 * support).sum(axis=1), support.sum(axis=1))


def _ece(w, c):
    return _divide(np.abs(w @ c["ece_terms"]).sum(axis=1), w.sum(axis=1))


# "group.key" of a strategy's metrics (or "tokens.key" of its token summary) -> statistic of the clip columns.
STATISTICS: dict[str, Statistic] = {
    "classification.accuracy": _mean("correct"),
    "classification.balanced_accuracy": _balanced_accuracy,
    "classification.macro_f1": _macro_f1,
    "classification.weighted_f1": _weighted_f1,
    "classification.invalid_rate": _mean("invalid"),
    "distribution.js_divergence": _mean("js"),
    "distribution.kl_divergence": _mean("kl"),
    "distribution.bhattacharyya": _mean("bhattacharyya"),
    "calibration.brier": _mean("brier"),
    "calibration.soft_brier": _mean("soft_brier"),
    "calibration.ece": _ece,
    "reasoning.format_validity": _mean("format_valid"),
    "reasoning.consistency": _ratio("consistent", "reasoned_valid"),
    "reasoning.cue_hallucination_rate": _ratio("cue_contradicted", "cue_claims"),
    "tokens.answered": _mean("answered"),
    "tokens.total_per_item": _mean("tokens"),
}
# Units the ratio metrics average over (n of the interval is clips; these say how many of the unit they held).
DENOMINATORS = {"reasoning.consistency": "reasoned_valid", "reasoning.cue_hallucination_rate": "cue_claims"}


def reported_value(strategy: dict, name: str) -> Any:
    group, key = name.split(".", 1)
    source = strategy.get("tokens", {}) if group == "tokens" else strategy.get("metrics", {}).get(group, {})
    return source.get(key) if isinstance(source, dict) else None


def intervals_for(strategy: dict, cols: Columns, n: int, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                  level: float = DEFAULT_LEVEL) -> tuple[dict, dict]:
    """(intervals, skipped): a bootstrap interval per reported metric the statistics cover, one resampling for all."""
    counts = resample_counts(n, draws, seed)
    intervals, skipped = {}, {}
    for name, statistic in STATISTICS.items():
        reported = reported_value(strategy, name)
        if not isinstance(reported, (int, float)) or isinstance(reported, bool):
            continue
        result = bootstrap_interval(statistic, cols, n, draws=draws, seed=seed, level=level, counts=counts)
        if result["estimate"] is None or not math.isclose(result["estimate"], reported, rel_tol=ESTIMATE_TOLERANCE,
                                                          abs_tol=ESTIMATE_TOLERANCE):
            skipped[name] = f"the clip statistic gives {result['estimate']}, the metric {reported}"
            continue
        if name in DENOMINATORS:
            result["denominator"] = {DENOMINATORS[name]: int(cols[DENOMINATORS[name]].sum())}
        intervals[name] = result
    return intervals, skipped


def _claims(item: ItemResult, record: EmotionRecord, labels: tuple[str, ...]) -> list[dict]:
    """The rationale's cue claims with their verdict against the clip's measured cues."""
    text = item.final_text or ""
    parsed = parse_response(text, labels=labels)
    checked = ground(parsed.think or text, dict(record.cues or {}))
    verdicts = [("supported", checked.supported), ("contradicted", checked.contradicted),
                ("unmeasured", checked.unchecked)]
    return [{"cue": c.cue, "level": c.level, "negated": c.negated, "hedged": c.hedged, "clause": c.clause,
             "verdict": verdict} for verdict, claims in verdicts for c in claims]


def group_value(record: EmotionRecord, field_name: str) -> str:
    """A record's group under ``group_by`` (the metrics' rule)."""
    return str(getattr(record, field_name, None) or record.meta.get(field_name) or "unknown")


def read_items(path: Path) -> list[ItemResult]:
    names = {f.name for f in dataclasses.fields(ItemResult)}
    with open(path, encoding="utf-8") as fh:
        return [ItemResult(**{k: v for k, v in json.loads(line).items() if k in names}) for line in fh if line.strip()]


def load_run(report: dict, out: Path) -> tuple[dict[str, list[ItemResult]], dict[str, EmotionRecord]] | str:
    """The run's items per strategy and its records, or why they cannot be read."""
    items = {}
    for name in report.get("strategies", {}):
        path = out / "predictions" / f"{name}.jsonl"
        if not path.is_file():
            return f"no predictions file {path}"
        items[name] = read_items(path)
    wanted = {i.record_id for rows in items.values() for i in rows}
    records_path = Path(str(report.get("records_path", "")))
    if not records_path.is_file():
        return f"records file {records_path} not found"
    try:
        records = {r.id: r for r in iter_records(records_path) if r.id in wanted}
    except RecordError as err:
        return f"records file {records_path}: {err}"
    missing = wanted - set(records)
    if missing:
        return f"{len(missing)} predicted record(s) missing from {records_path}, e.g. {sorted(missing)[0]}"
    return items, records


def _ambiguity_bins(report: dict, records: list[EmotionRecord]) -> list[str]:
    binning = next((s["metrics"]["ambiguity"].get("binning", {}) for s in report["strategies"].values()
                    if "ambiguity" in s.get("metrics", {})), None)
    if binning is None:
        return [""] * len(records)
    values = [entropy(full_distribution(r)) for r in records]
    bins = quantile_bins(values, binning.get("requested_bins", 3), binning.get("min_count", DEFAULT_MIN_GROUP_COUNT))
    names = [""] * len(records)
    for name, members in zip(ambiguity_bin_names(len(bins)), bins):
        for i in members:
            names[i] = name
    return names


def build_clips(report: dict, items: dict[str, list[ItemResult]], records: dict[str, EmotionRecord],
                audio_src) -> list[dict]:
    """One entry per clip (in the run's order) with every strategy's answer on it; ``audio_src(record)`` gives the
    player's source (a relative path or a data URI)."""
    labels = tuple(report["labels"])
    order = [i.record_id for i in next(iter(items.values()))] if items else []
    clip_records = [records[rid] for rid in order]
    bins = _ambiguity_bins(report, clip_records)
    group_fields = sorted({f for s in report["strategies"].values() for f in (s["metrics"].get("groups") or {})})
    clips = []
    for record, ambiguity_bin in zip(clip_records, bins):
        reference = full_distribution(record)
        clips.append({
            "id": record.id, "audio": audio_src(record), "duration": record.duration, "transcript": record.transcript,
            "speaker": record.speaker, "gender": record.gender, "label": record.label,
            "reference": reference, "ambiguity": entropy(reference), "ambiguity_bin": ambiguity_bin,
            "groups": {f: group_value(record, f) for f in group_fields},
            "cues": measured_levels(record.cues), "strategies": {}})
    for name, rows in items.items():
        inputs = MetricInputs(rows, records, labels)
        for clip, item, scores, dist in zip(clips, rows, item_scores(inputs), inputs.pred_dists):
            clip["strategies"][name] = {
                "prediction": item.prediction, "distribution": dict(zip(labels, dist)),
                "rationale": item.final_text, "claims": _claims(item, records[item.record_id], labels),
                "judge": item.judge_score, "failure": item.failure, "notes": item.notes, "scores": scores}
    return clips


def clip_columns(clips: list[dict], strategy: str, n_labels: int) -> dict[str, np.ndarray]:
    return columns([c["strategies"][strategy]["scores"] for c in clips], n_labels)


def attach(report: dict, out: Path, *, embed_audio: bool = False, draws: int = DEFAULT_DRAWS,
           level: float = DEFAULT_LEVEL) -> None:
    """Add ``clips``, each strategy's ``intervals`` and the ``bootstrap`` settings to ``report`` (in place), read
    from the run's files under ``out``; when they cannot be read, ``bootstrap`` says why and nothing else changes."""
    loaded = load_run(report, out)
    if isinstance(loaded, str):
        report["bootstrap"] = {"skipped": loaded}
        return
    items, records = loaded
    data_root = Path(str(report.get("data_root") or Path(str(report["records_path"])).parent))

    def audio_src(record: EmotionRecord) -> str:
        path = record.audio_path(data_root)
        if embed_audio and path.is_file():
            import base64

            return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Path(_relative(path, out)).as_posix()

    report["clips"] = build_clips(report, items, records, audio_src)
    seed = int(report.get("seed") or 0)
    n_labels = len(report["labels"])
    for name, strategy in report["strategies"].items():
        cols = clip_columns(report["clips"], name, n_labels)
        strategy["intervals"], skipped = intervals_for(strategy, cols, len(report["clips"]), draws=draws, seed=seed,
                                                       level=level)
        if skipped:
            strategy["intervals_skipped"] = skipped
            logger.warning("%s: no interval for %s", name, skipped)
    report["bootstrap"] = {"method": "percentile bootstrap, clips resampled with replacement", "draws": draws,
                           "level": level, "seed": seed, "n": len(report["clips"])}


def _relative(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()
