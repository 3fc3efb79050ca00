"""Metric glue: strategy results + records -> the metric modules shipped in ``emoreason/eval/metric_modules/``
(``evaluate.load(path)``, found through ``importlib.resources`` so an installed package needs no source checkout).

Failed and invalid items are never dropped: they count as wrong answers (label "<invalid>") with a uniform
distribution (maximal ignorance) in every metric, and the report lists them.

References follow the data layer's vote rule (:func:`emoreason.data.labels.label_set_shares`, the rule of
``vote_distribution``): a suite's label set sees each label's share of ALL votes, and votes for emotions outside the
set stay in the denominator. When some record has such out-of-set mass, distribution and calibration metrics compare
over the suite's labels plus one "outside the label set" column (a prediction, limited to the suite's labels, gives
it 0), so an item whose raters mostly heard another emotion is never scored as a unanimous one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.labels import entropy, label_set_shares, vote_distribution
from ..data.response_format import parse_answer
from ..data.schema import EmotionRecord

INVALID = "<invalid>"
DEFAULT_MIN_GROUP_COUNT = 10
OUTSIDE_TOLERANCE = 1e-9  # out-of-set mass below this is float noise from shares that sum to 1


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


def full_distribution(record: EmotionRecord) -> dict[str, float]:
    """The record's soft label over every emotion its raters used (its stored distribution, else its votes, else
    all mass on its label)."""
    if record.distribution:
        return dict(record.distribution)
    emotions = [v.emotion for v in record.votes if v.emotion is not None]
    if emotions:
        return vote_distribution(emotions)
    return {record.label: 1.0} if record.label else {}


def reference_distribution(record: EmotionRecord, labels: tuple[str, ...]) -> list[float]:
    """Shares of the suite's labels by the all-inclusive vote rule; they sum to 1 minus the out-of-set mass."""
    shares = label_set_shares(full_distribution(record), labels)
    return [shares[k] for k in labels]


def predicted_distribution(item, labels: tuple[str, ...]) -> list[float]:
    """The item's distribution over the suite's labels; uniform when it has none (failed, invalid) or when its
    shares are not finite non-negative numbers summing to more than 0."""
    uniform = [1.0 / len(labels)] * len(labels)
    if item.distribution is None:
        return uniform
    shares = [float(item.distribution.get(k, 0.0)) for k in labels]
    if not all(math.isfinite(s) for s in shares):
        return uniform
    shares = [max(0.0, s) for s in shares]
    total = sum(shares)
    return [s / total for s in shares] if total > 0 else uniform


def item_format_valid(item, labels: tuple[str, ...]) -> bool:
    """Whether the item's final completion answered in the format its strategy asked for (failed items: no)."""
    if item.failed or item.final_text is None:
        return False
    return parse_answer(item.final_text, getattr(item, "style", "cot"), labels).valid


class MetricInputs:
    """Aligned per-item views of results and records, built once per strategy."""

    def __init__(self, items: list, records: dict[str, EmotionRecord], labels: tuple[str, ...]):
        self.items = items
        self.records = [records[item.record_id] for item in items]
        self.labels = labels
        self.references = [r.label for r in self.records]
        self.predictions = [item.prediction if item.prediction in labels else INVALID for item in items]
        self.predicted_index = [labels.index(p) if p in labels else -1 for p in self.predictions]
        self.pred_dists = [predicted_distribution(item, labels) for item in items]
        self.ref_dists = [reference_distribution(r, labels) for r in self.records]
        self.outside = [max(0.0, 1.0 - sum(d)) for d in self.ref_dists]
        self.has_outside = any(o > OUTSIDE_TOLERANCE for o in self.outside)
        if self.has_outside:  # one more column: the raters' mass on emotions outside the suite's label set
            self.pred_cols = [d + [0.0] for d in self.pred_dists]
            self.ref_cols = [d + [o] for d, o in zip(self.ref_dists, self.outside)]
        else:
            self.pred_cols, self.ref_cols = self.pred_dists, self.ref_dists
        self.ambiguity = [entropy(full_distribution(r)) for r in self.records]


def _classification(x: MetricInputs, **_) -> dict:
    return load_metric("emotion_classification").compute(predictions=x.predictions, references=x.references,
                                                         labels=list(x.labels))


def _multilabel(x: MetricInputs, **_) -> dict:
    # Un-normalised reference shares: the 1/C rule reads each label's share of all votes (C = the suite's labels).
    return load_metric("multilabel_f1").compute(predictions=x.pred_dists, references=x.ref_dists)


def _distribution(x: MetricInputs, **_) -> dict:
    result = load_metric("distribution_agreement").compute(predictions=x.pred_cols, references=x.ref_cols)
    result["outside_label_set_mass"] = sum(x.outside) / len(x.outside) if x.outside else 0.0
    result["outside_column"] = x.has_outside
    return result


def _calibration(x: MetricInputs, **_) -> dict:
    return load_metric("calibration").compute(predictions=x.pred_cols,
                                              references=[x.labels.index(r) for r in x.references],
                                              soft_references=x.ref_cols, predicted_labels=x.predicted_index)


def ambiguity_bin_names(n_bins: int) -> list[str]:
    return {1: ["all"], 2: ["low", "high"], 3: ["low", "medium", "high"]}.get(
        n_bins, [f"bin{i + 1}" for i in range(n_bins)])


def quantile_bins(values: list[float], n_bins: int, min_count: int) -> list[list[int]]:
    """Items (indices) in up to ``n_bins`` equal-count bins by value, ties never split; a bin with fewer than
    ``min_count`` items is merged into its smaller neighbour, so every bin reported holds at least ``min_count``
    (unless all items together hold fewer)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    runs: list[list[int]] = []  # items sharing one value
    for i in order:
        if runs and math.isclose(values[runs[-1][0]], values[i], abs_tol=1e-12):
            runs[-1].append(i)
        else:
            runs.append([i])
    bins: list[list[int]] = []
    remaining, target = len(values), 0.0
    for run in runs:
        if not bins or (len(bins[-1]) >= target and len(bins) < n_bins):
            target = remaining / (n_bins - len(bins))  # the items left, shared equally by the bins left
            bins.append([])
        bins[-1].extend(run)
        remaining -= len(run)
    while len(bins) > 1 and min(len(b) for b in bins) < min_count:
        small = min(range(len(bins)), key=lambda b: len(bins[b]))
        if small == 0:
            neighbour = 1
        elif small == len(bins) - 1:
            neighbour = small - 1
        else:
            neighbour = small - 1 if len(bins[small - 1]) <= len(bins[small + 1]) else small + 1
        lo, hi = sorted((small, neighbour))
        bins[lo:hi + 1] = [bins[lo] + bins[hi]]
    return bins


def _ambiguity(x: MetricInputs, ambiguity_bins: int = 3, min_group_count: int = DEFAULT_MIN_GROUP_COUNT,
               **_) -> dict:
    """Scores by annotator ambiguity (entropy of the full vote distribution, bits) in equal-count bins."""
    bins = quantile_bins(x.ambiguity, ambiguity_bins, min_group_count)
    names = ambiguity_bin_names(len(bins))
    groups = [""] * len(x.items)
    for name, members in zip(names, bins):
        for i in members:
            groups[i] = name
    result = load_metric("group_gap").compute(predictions=x.predictions, references=x.references, groups=groups,
                                              min_count=min_group_count)
    js_metric = load_metric("distribution_agreement")
    for name, members in zip(names, bins):
        stats = result["by_group"][name]
        stats["js_divergence"] = js_metric.compute(predictions=[x.pred_cols[i] for i in members],
                                                   references=[x.ref_cols[i] for i in members])["js_divergence"]
        stats["entropy_range"] = [min(x.ambiguity[i] for i in members), max(x.ambiguity[i] for i in members)]
    result["bin_order"] = names
    result["binning"] = {"method": "equal-count (quantile) bins of vote entropy, ties kept together",
                         "requested_bins": ambiguity_bins, "min_count": min_group_count,
                         "counts": [len(b) for b in bins]}
    return result


def _groups(x: MetricInputs, group_by: tuple[str, ...] = (), min_group_count: int = DEFAULT_MIN_GROUP_COUNT,
            **_) -> dict:
    out = {}
    for field_name in group_by:
        groups = [str(getattr(r, field_name, None) or r.meta.get(field_name) or "unknown") for r in x.records]
        if len(set(groups)) < 2:
            continue
        out[field_name] = load_metric("group_gap").compute(predictions=x.predictions, references=x.references,
                                                           groups=groups, min_count=min_group_count)
    return out


def _reasoning(x: MetricInputs, **_) -> dict:
    """Format validity of every strategy against the format it asked for; rationale scores (consistency, cue
    hallucination) over the items whose strategy asked for a rationale."""
    reasoned = [i for i, item in enumerate(x.items) if getattr(item, "style", "cot") == "cot"]
    if reasoned:
        result = load_metric("reasoning_quality").compute(
            predictions=[x.items[i].final_text or "" for i in reasoned], references=[x.references[i] for i in reasoned],
            cues=[x.records[i].cues or {} for i in reasoned], labels=list(x.labels),
        )
    else:
        result = {"consistency": None, "cue_claims": 0, "cue_hallucination_rate": None, "invalid_reasons": {},
                  "rationale": "not asked for: the strategy asks for the label only"}
    valid = [item_format_valid(item, x.labels) for item in x.items]
    result["format_validity"] = sum(valid) / len(valid) if valid else 0.0
    samples = sum(item.total_samples for item in x.items)
    result["sample_validity"] = sum(item.valid_samples for item in x.items) / samples if samples else 0.0
    return result


def _judge(x: MetricInputs, judge_scores: list | None = None, **_) -> dict:
    if judge_scores is None:
        return {"skipped": "no judge configured"}
    scored = [s.normalized for s in judge_scores if s is not None and s.normalized is not None]
    return {"groundedness": sum(scored) / len(scored) if scored else None, "scored": len(scored),
            "unreadable": len(judge_scores) - len(scored)}


# Valence/arousal/dominance (CCC) is not a group: no prompt or training target asks a model for them, so nothing
# would ever be scored. A suite that wants it needs a prompt asking for them and a parser in emoreason.data first.
METRIC_GROUPS: dict[str, Callable[..., dict]] = {
    "classification": _classification,
    "multilabel": _multilabel,
    "distribution": _distribution,
    "calibration": _calibration,
    "ambiguity": _ambiguity,
    "groups": _groups,
    "reasoning": _reasoning,
    "judge": _judge,
}


def compute_metrics(items: list, records: dict[str, EmotionRecord], labels: tuple[str, ...], groups: tuple[str, ...],
                    **options: Any) -> dict[str, dict]:
    inputs = MetricInputs(items, records, labels)
    return {name: METRIC_GROUPS[name](inputs, **options) for name in groups}
