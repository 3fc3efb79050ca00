"""Metric glue: strategy results + records -> the metric modules shipped in ``emoreason/eval/metric_modules/``
(``evaluate.load(path)``, found through ``importlib.resources`` so an installed package needs no source checkout).

Failed and invalid items are never dropped: they count as wrong answers (label "<invalid>") with a uniform
distribution (maximal ignorance) in every metric, and the report lists them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.labels import entropy
from ..data.schema import EmotionRecord

INVALID = "<invalid>"


def metrics_dir() -> Path:
    """The package's ``metric_modules`` folder (or ``$EMOREASON_METRICS_DIR`` for a user's own modules)."""
    override = os.environ.get("EMOREASON_METRICS_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("emoreason.eval") / "metric_modules"))


@lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    path = metrics_dir() / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"no metric module {name!r} at {path}")
    return evaluate.load(str(path), keep_in_memory=True)


def reference_distribution(record: EmotionRecord, labels: tuple[str, ...]) -> list[float]:
    shares = [float(record.distribution.get(k, 0.0)) for k in labels] if record.distribution else []
    total = sum(shares)
    if total <= 0:
        return [float(k == record.label) for k in labels]
    return [s / total for s in shares]


def predicted_distribution(item, labels: tuple[str, ...]) -> list[float]:
    if item.distribution is None:
        return [1.0 / len(labels)] * len(labels)
    shares = [max(0.0, float(item.distribution.get(k, 0.0))) for k in labels]
    total = sum(shares)
    return [s / total for s in shares] if total > 0 else [1.0 / len(labels)] * len(labels)


class MetricInputs:
    """Aligned per-item views of results and records, built once per strategy."""

    def __init__(self, items: list, records: dict[str, EmotionRecord], labels: tuple[str, ...]):
        self.items = items
        self.records = [records[item.record_id] for item in items]
        self.labels = labels
        self.references = [r.label for r in self.records]
        self.predictions = [item.prediction if item.prediction in labels else INVALID for item in items]
        self.pred_dists = [predicted_distribution(item, labels) for item in items]
        self.ref_dists = [reference_distribution(r, labels) for r in self.records]


def _classification(x: MetricInputs, **_) -> dict:
    return load_metric("emotion_classification").compute(predictions=x.predictions, references=x.references,
                                                         labels=list(x.labels))


def _multilabel(x: MetricInputs, **_) -> dict:
    return load_metric("multilabel_f1").compute(predictions=x.pred_dists, references=x.ref_dists)


def _distribution(x: MetricInputs, **_) -> dict:
    return load_metric("distribution_agreement").compute(predictions=x.pred_dists, references=x.ref_dists)


def _calibration(x: MetricInputs, **_) -> dict:
    return load_metric("calibration").compute(predictions=x.pred_dists,
                                              references=[x.labels.index(r) for r in x.references],
                                              soft_references=x.ref_dists)


def ambiguity_bin_names(n_bins: int) -> list[str]:
    return ["low", "medium", "high"] if n_bins == 3 else [f"bin{i + 1}" for i in range(n_bins)]


def _ambiguity(x: MetricInputs, ambiguity_bins: int = 3, **_) -> dict:
    """Scores by annotator ambiguity: entropy of the vote distribution in equal-width bins over [0, log2 C]."""
    names = ambiguity_bin_names(ambiguity_bins)
    top = math.log2(len(x.labels))
    entropies = [entropy(dict(zip(x.labels, d))) for d in x.ref_dists]
    bins = [names[min(ambiguity_bins - 1, int(e / top * ambiguity_bins))] if top > 0 else names[0]
            for e in entropies]
    result = load_metric("group_gap").compute(predictions=x.predictions, references=x.references, groups=bins)
    js_metric = load_metric("distribution_agreement")
    for name, stats in result["by_group"].items():
        idx = [i for i, b in enumerate(bins) if b == name]
        stats["js_divergence"] = js_metric.compute(predictions=[x.pred_dists[i] for i in idx],
                                                   references=[x.ref_dists[i] for i in idx])["js_divergence"]
        stats["entropy_range"] = [top * names.index(name) / ambiguity_bins, top * (names.index(name) + 1)
                                  / ambiguity_bins]
    result["bin_order"] = [n for n in names if n in result["by_group"]]
    return result


def _groups(x: MetricInputs, group_by: tuple[str, ...] = (), **_) -> dict:
    out = {}
    for field_name in group_by:
        groups = [str(getattr(r, field_name, None) or r.meta.get(field_name) or "unknown") for r in x.records]
        if len(set(groups)) < 2:
            continue
        out[field_name] = load_metric("group_gap").compute(predictions=x.predictions, references=x.references,
                                                           groups=groups)
    return out


def _reasoning(x: MetricInputs, **_) -> dict:
    result = load_metric("reasoning_quality").compute(
        predictions=[item.final_text or "" for item in x.items], references=x.references,
        cues=[r.cues or {} for r in x.records], labels=list(x.labels),
    )
    samples = sum(item.total_samples for item in x.items)
    result["sample_validity"] = sum(item.valid_samples for item in x.items) / samples if samples else 0.0
    return result


_VAD_RE = re.compile(r"<vad>(.*?)</vad>", re.S)
_DIM_RE = re.compile(r"(valence|arousal|dominance)\s*[:=]\s*(-?[0-9]*\.?[0-9]+)", re.I)


def parse_vad(text: str | None) -> dict[str, float]:
    match = _VAD_RE.search(text or "")
    return {d.lower(): float(v) for d, v in _DIM_RE.findall(match.group(1))} if match else {}


def _vad(x: MetricInputs, **_) -> dict:
    """CCC per dimension for records with reference values and completions with a <vad> block."""
    out = {}
    predicted = [parse_vad(item.final_text) for item in x.items]
    for dim in ("valence", "arousal", "dominance"):
        pairs = [(p[dim], getattr(r, dim)) for p, r in zip(predicted, x.records)
                 if dim in p and getattr(r, dim) is not None]
        if len(pairs) >= 2:
            out[dim] = load_metric("ccc").compute(predictions=[a for a, _ in pairs], references=[b for _, b in pairs])
            out[dim]["count"] = len(pairs)
    return out or {"skipped": "no completion gave a <vad> block for records with valence/arousal/dominance"}


def _judge(x: MetricInputs, judge_scores: list | None = None, **_) -> dict:
    if judge_scores is None:
        return {"skipped": "no judge configured"}
    scored = [s.normalized for s in judge_scores if s is not None and s.normalized is not None]
    return {"groundedness": sum(scored) / len(scored) if scored else None, "scored": len(scored),
            "unreadable": len(judge_scores) - len(scored)}


METRIC_GROUPS: dict[str, Callable[..., dict]] = {
    "classification": _classification,
    "multilabel": _multilabel,
    "distribution": _distribution,
    "calibration": _calibration,
    "ambiguity": _ambiguity,
    "groups": _groups,
    "reasoning": _reasoning,
    "vad": _vad,
    "judge": _judge,
}


def compute_metrics(items: list, records: dict[str, EmotionRecord], labels: tuple[str, ...], groups: tuple[str, ...],
                    **options: Any) -> dict[str, dict]:
    inputs = MetricInputs(items, records, labels)
    return {name: METRIC_GROUPS[name](inputs, **options) for name in groups}
