"""The metric modules shipped in emoreason/eval/metric_modules, loaded offline by path, against scikit-learn / scipy on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, r2_score

from emoreason.eval.metrics import load_metric

LABELS = ["neutral", "happy", "sad", "angry"]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_classification_matches_sklearn(rng):
    refs = rng.choice(LABELS, 200).tolist()
    preds = rng.choice(LABELS + ["<invalid>"], 200, p=[0.225] * 4 + [0.1]).tolist()
    out = load_metric("emotion_classification").compute(predictions=preds, references=refs, labels=LABELS)
    assert out["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(refs, preds))
    assert out["macro_f1"] == pytest.approx(f1_score(refs, preds, labels=LABELS, average="macro"))
    assert out["weighted_f1"] == pytest.approx(f1_score(refs, preds, labels=LABELS, average="weighted"))
    assert out["invalid_rate"] == pytest.approx(preds.count("<invalid>") / 200)
    expected = confusion_matrix(refs, preds, labels=LABELS + ["<invalid>"])[:4]
    assert np.array_equal(np.asarray(out["confusion_matrix"]), expected)
    assert sum(map(sum, out["confusion_matrix"])) == 200  # invalid answers are counted, not dropped


def test_distribution_agreement_matches_scipy(rng):
    pred = rng.dirichlet(np.ones(4), 50)
    ref = rng.dirichlet(np.ones(4) * 0.5, 50)
    out = load_metric("distribution_agreement").compute(predictions=pred.tolist(), references=ref.tolist())
    assert out["js_divergence"] == pytest.approx(np.mean([jensenshannon(p, q, base=2) ** 2 for p, q in zip(pred, ref)]))
    smoothed = (pred + 1e-6) / (pred + 1e-6).sum(1, keepdims=True)
    assert out["kl_divergence"] == pytest.approx(np.mean([entropy(q, p) for p, q in zip(smoothed, ref)]))
    assert out["bhattacharyya"] == pytest.approx(np.mean(np.sqrt(pred * ref).sum(1)))
    assert out["r2"] == pytest.approx(r2_score(ref.ravel(), pred.ravel()))
    same = load_metric("distribution_agreement").compute(predictions=ref.tolist(), references=ref.tolist())
    assert same["js_divergence"] == pytest.approx(0.0, abs=1e-9) and same["bhattacharyya"] == pytest.approx(1.0)


def test_multilabel_f1_uses_the_one_over_c_rule(rng):
    pred = rng.dirichlet(np.ones(4), 80)
    ref = rng.dirichlet(np.ones(4), 80)
    out = load_metric("multilabel_f1").compute(predictions=pred.tolist(), references=ref.tolist())
    p, r = (pred > 0.25).astype(int), (ref > 0.25).astype(int)
    assert out["micro_f1"] == pytest.approx(f1_score(r, p, average="micro", zero_division=0))
    assert out["macro_f1"] == pytest.approx(f1_score(r, p, average="macro", zero_division=0))
    assert out["samples_f1"] == pytest.approx(f1_score(r, p, average="samples", zero_division=0))


def test_calibration_brier_and_ece(rng):
    probs = rng.dirichlet(np.ones(4), 300)
    refs = rng.integers(0, 4, 300)
    out = load_metric("calibration").compute(predictions=probs.tolist(), references=refs.tolist(),
                                             soft_references=np.eye(4)[refs].tolist())
    onehot = np.eye(4)[refs]
    assert out["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    assert out["soft_brier"] == pytest.approx(out["brier"])
    # ECE by an independent loop over equal-width (lower, upper] bins.
    conf, correct = probs.max(1), probs.argmax(1) == refs
    ece = 0.0
    for lo in np.arange(10) / 10:
        mask = (conf > lo) & (conf <= lo + 0.1)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    assert out["ece"] == pytest.approx(ece)
    assert sum(row["count"] for row in out["reliability"]) == 300
    perfect = load_metric("calibration").compute(predictions=np.eye(4)[refs].tolist(), references=refs.tolist())
    assert perfect["brier"] == pytest.approx(0.0) and perfect["ece"] == pytest.approx(0.0)


def test_ccc_matches_its_definition_via_scipy(rng):
    x = rng.normal(0.2, 1.0, 100)
    y = 0.6 * x + rng.normal(0.5, 0.7, 100)
    out = load_metric("ccc").compute(predictions=x.tolist(), references=y.tolist())
    r = pearsonr(x, y).statistic
    expected = 2 * r * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert out["ccc"] == pytest.approx(expected)
    assert out["pearson"] == pytest.approx(r)
    assert load_metric("ccc").compute(predictions=y.tolist(), references=y.tolist())["ccc"] == pytest.approx(1.0)


def test_group_gap(rng):
    refs = rng.choice(LABELS, 120).tolist()
    preds = [r if i % 3 else "sad" for i, r in enumerate(refs)]
    groups = ["female" if i % 2 else "male" for i in range(120)]
    out = load_metric("group_gap").compute(predictions=preds, references=refs, groups=groups)
    for group in ("female", "male"):
        idx = [i for i, g in enumerate(groups) if g == group]
        assert out["by_group"][group]["accuracy"] == pytest.approx(
            accuracy_score([refs[i] for i in idx], [preds[i] for i in idx]))
    accs = [out["by_group"][g]["accuracy"] for g in ("female", "male")]
    assert out["accuracy_gap"] == pytest.approx(max(accs) - min(accs))


def test_reasoning_quality_validity_consistency_and_hallucinated_cues():
    texts = [
        "<think>The pitch is high and the speaker talks fast, which sounds happy.</think><answer>happy</answer>",
        "<think>The voice is loud, so angry... no, it is sad.</think><answer>angry</answer>",  # inconsistent
        "<think>Low pitch and slow pace.</think><answer>sad</answer>",  # names no emotion
        "angry",  # malformed: invalid
    ]
    cues = [{"pitch": "high", "rate": {"word": "fast"}}, {"energy": "soft"}, {"pitch_level": "low", "rate": "fast"},
            {}]
    out = load_metric("reasoning_quality").compute(predictions=texts, references=["happy", "sad", "sad", "angry"],
                                                   cues=cues, labels=LABELS)
    assert out["format_validity"] == pytest.approx(0.75)
    assert out["consistency"] == pytest.approx(1 / 3)
    # Checked claims: pitch high (ok), rate fast (ok), volume loud vs soft (wrong), pitch low (ok), pace slow vs fast.
    assert out["cue_claims"] == 5
    assert out["cue_hallucination_rate"] == pytest.approx(2 / 5)
    assert out["invalid_reasons"].get("missing_answer") == 1
