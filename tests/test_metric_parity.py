"""Property-based parity of every metric module with scikit-learn / scipy or the textbook formula, on random inputs
and on the edge cases that break metrics: one item, a class never predicted, zero shares, all-uniform references.

Where a module calls scikit-learn itself, the expected value here is written out by hand, so a wrong argument to
scikit-learn (a label set, an average, a normalisation) shows up as a difference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from sklearn.metrics import f1_score, r2_score

from emoreason.data.response_format import parse_response
from emoreason.eval.metrics import load_metric

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LABELS = ["neutral", "happy", "sad", "angry"]
INVALID = "<invalid>"

share = st.sampled_from([0.0, 0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5, 1.0, 2.5]) | st.floats(0.0, 5.0)


@st.composite
def distributions(draw, min_items=1, max_items=12):
    """(predictions, references): rows of C non-negative shares (zero rows allowed), C in 2..6."""
    c = draw(st.integers(2, 6))
    n = draw(st.integers(min_items, max_items))
    rows = st.lists(st.lists(share, min_size=c, max_size=c), min_size=n, max_size=n)
    return draw(rows), draw(rows)


def normalise(rows):
    rows = np.asarray(rows, dtype=float)
    totals = rows.sum(1, keepdims=True)
    return np.where(totals > 0, rows / np.where(totals > 0, totals, 1), 1 / rows.shape[1])


@st.composite
def label_lists(draw):
    n = draw(st.integers(1, 25))
    refs = draw(st.lists(st.sampled_from(LABELS), min_size=n, max_size=n))
    preds = draw(st.lists(st.sampled_from(LABELS + [INVALID]), min_size=n, max_size=n))
    return preds, refs


# -- emotion_classification --------------------------------------------------------------------------------------
@FAST
@given(label_lists())
@example((["happy"], ["happy"]))  # one item
@example((["happy", "happy", INVALID], ["happy", "sad", "sad"]))  # a class never predicted, an invalid answer
@example(([INVALID, INVALID], ["sad", "sad"]))  # nothing valid
def test_classification_matches_the_formulas(case):
    preds, refs = case
    out = load_metric("emotion_classification").compute(predictions=preds, references=refs, labels=LABELS)
    p, r = np.asarray(preds), np.asarray(refs)
    assert out["accuracy"] == pytest.approx(np.mean(p == r))
    present = [k for k in LABELS if k in refs]
    assert out["balanced_accuracy"] == pytest.approx(np.mean([np.mean(p[r == k] == k) for k in present]))
    f1 = []
    for k in LABELS:  # F1 per label of the suite; 0 where undefined
        tp, fp, fn = np.sum((p == k) & (r == k)), np.sum((p == k) & (r != k)), np.sum((p != k) & (r == k))
        f1.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    assert out["macro_f1"] == pytest.approx(np.mean(f1))
    support = np.array([np.sum(r == k) for k in LABELS])
    assert out["weighted_f1"] == pytest.approx(np.sum(np.array(f1) * support) / support.sum())
    assert out["invalid_rate"] == pytest.approx(np.mean(p == INVALID))
    matrix = np.asarray(out["confusion_matrix"])
    assert matrix.sum() == len(refs) and matrix[:, -1].sum() == np.sum(p == INVALID)
    assert out["labels_without_references"] == [k for k in LABELS if k not in refs]


# -- distribution_agreement --------------------------------------------------------------------------------------
@FAST
@given(distributions())
@example(([[1.0, 0.0]], [[0.0, 1.0]]))  # one item, disjoint support: JS = 1
@example(([[0.0, 0.0, 0.0]], [[0.2, 0.3, 0.5]]))  # a zero row is read as uniform
@example(([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[1 / 3] * 3, [1 / 3] * 3]))  # all-uniform references
def test_distribution_agreement_matches_scipy_and_sklearn(case):
    predictions, references = case
    out = load_metric("distribution_agreement").compute(predictions=predictions, references=references)
    p, q = normalise(predictions), normalise(references)
    with np.errstate(invalid="ignore"):
        scipy_js = np.array([jensenshannon(a, b, base=2) for a, b in zip(p, q)]) ** 2
    # scipy's NaN rows are rows equal up to rounding: their divergence is 0 (here, never NaN).
    assert out["js_divergence"] == pytest.approx(np.mean(np.nan_to_num(scipy_js, nan=0.0)), abs=1e-12)
    assert 0.0 <= out["js_divergence"] <= 1.0
    smoothed = normalise(p + 1e-6)
    assert out["kl_divergence"] == pytest.approx(np.mean([entropy(b, a) for a, b in zip(smoothed, q)]))
    assert out["bhattacharyya"] == pytest.approx(np.mean(np.sqrt(p * q).sum(1)))
    if np.ptp(q) <= 1e-9:  # constant reference cells (the module's CONSTANT_TOLERANCE): R^2 is undefined
        assert out["r2"] is None and "variance" in out["r2_undefined"]
    else:
        assert out["r2"] == pytest.approx(r2_score(q.ravel(), p.ravel()))


# -- multilabel_f1 -----------------------------------------------------------------------------------------------
@FAST
@given(distributions())
@example(([[0.2, 0.4, 0.4, 0.0]], [[0.2, 0.4, 0.4, 0.0]]))  # the 1/C worked example
@example(([[0.25, 0.25, 0.25, 0.25]], [[0.25, 0.25, 0.25, 0.25]]))  # uniform: nothing is present
def test_multilabel_f1_matches_sklearn_on_the_one_over_c_rule(case):
    predictions, references = case
    out = load_metric("multilabel_f1").compute(predictions=predictions, references=references)
    c = len(predictions[0])
    p, r = (np.asarray(predictions) > 1 / c).astype(int), (np.asarray(references) > 1 / c).astype(int)
    tp, fp, fn = np.sum(p & r), np.sum(p & (1 - r)), np.sum((1 - p) & r)
    assert out["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert out["macro_f1"] == pytest.approx(f1_score(r, p, average="macro", zero_division=0))
        assert out["samples_f1"] == pytest.approx(f1_score(r, p, average="samples", zero_division=0))


# -- calibration -------------------------------------------------------------------------------------------------
@st.composite
def calibration_cases(draw):
    predictions, soft = draw(distributions())
    c, n = len(predictions[0]), len(predictions)
    refs = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    answers = draw(st.lists(st.integers(-1, c - 1), min_size=n, max_size=n))
    return predictions, refs, soft, answers


def hand_ece(confidence, correct, bins=10):
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = ((confidence > lo) | (b == 0)) & (confidence <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return ece


@FAST
@given(calibration_cases())
@example(([[0.25, 0.25, 0.25, 0.25]], [0], [[1, 0, 0, 0]], [-1]))  # a failed item whose reference is label 0
@example(([[1.0, 0.0]], [0], [[0.0, 0.0]], [0]))  # one item, zero soft reference
# confidences 0.6 and 0.6000000000000001 on either side of the 0.6 bin edge (linspace's edge was the latter)
@example(([[0.0] * 4] * 9 + [[0, 0, 1 / 3, 0.5], [0, 3, 0, 2]], [0] * 10 + [1], [[0.0] * 4] * 11, [-1] * 11))
def test_calibration_matches_the_formulas(case):
    predictions, refs, soft, answers = case
    metric = load_metric("calibration")
    out = metric.compute(predictions=predictions, references=refs, soft_references=soft, predicted_labels=answers)
    p, q = normalise(predictions), normalise(soft)
    onehot = np.eye(p.shape[1])[refs]
    assert out["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, 1)))
    assert out["soft_brier"] == pytest.approx(np.mean(np.sum((p - q) ** 2, 1)))
    answers_arr, refs_arr = np.asarray(answers), np.asarray(refs)
    confidence = np.array([p[i, a] if a >= 0 else p[i].max() for i, a in enumerate(answers)])
    correct = ((answers_arr >= 0) & (answers_arr == refs_arr)).astype(float)
    assert out["ece"] == pytest.approx(hand_ece(confidence, correct))
    assert sum(row["count"] for row in out["reliability"]) == len(refs)
    by_argmax = metric.compute(predictions=predictions, references=refs)
    assert by_argmax["ece"] == pytest.approx(hand_ece(p.max(1), (p.argmax(1) == refs_arr).astype(float)))


# -- group_gap ---------------------------------------------------------------------------------------------------
@FAST
@given(label_lists(), st.data(), st.integers(1, 6))
def test_group_gap_matches_the_formulas(case, data, min_count):
    preds, refs = case
    groups = data.draw(st.lists(st.sampled_from(["f", "m", "x"]), min_size=len(refs), max_size=len(refs)))
    out = load_metric("group_gap").compute(predictions=preds, references=refs, groups=groups, min_count=min_count)
    p, r, g = np.asarray(preds), np.asarray(refs), np.asarray(groups)
    accuracy = {k: float(np.mean(p[g == k] == r[g == k])) for k in set(groups)}
    for k, acc in accuracy.items():
        assert out["by_group"][k]["accuracy"] == pytest.approx(acc)
        assert out["by_group"][k]["count"] == int(np.sum(g == k))
    counted = {k: a for k, a in accuracy.items() if np.sum(g == k) >= min_count}
    if len(counted) >= 2:
        assert out["accuracy_gap"] == pytest.approx(max(counted.values()) - min(counted.values()))
    else:
        assert out["accuracy_gap"] is None


# -- reasoning_quality (format validity: the shared parser; the rest: bounds) -------------------------------------
completion = st.sampled_from([
    "<think>The pitch is high, so happy.</think><answer>happy</answer>",
    "<think>Loud and fast: angry.</think><answer>sad</answer>",
    "<answer>sad</answer>", "sad", "", "<think></think><answer>happy</answer>",
    "<think>x</think><answer>happy</answer><answer>sad</answer>",
])


@FAST
@given(st.lists(completion, min_size=1, max_size=10))
def test_reasoning_quality_format_validity_is_the_strict_parser_share(texts):
    out = load_metric("reasoning_quality").compute(predictions=texts, references=["happy"] * len(texts),
                                                   cues=[{"pitch": "high"}] * len(texts), labels=LABELS)
    valid = [parse_response(t, strict=True, labels=tuple(LABELS)).valid for t in texts]
    assert out["format_validity"] == pytest.approx(np.mean(valid))
    assert 0.0 <= out["consistency"] <= 1.0
    rate = out["cue_hallucination_rate"]
    assert rate is None or 0.0 <= rate <= 1.0
