"""The metric modules shipped in emoreason/eval/metric_modules, loaded offline by path, against scikit-learn / scipy
on random inputs, and the evaluator's metric glue on the defects of issue 14."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
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


# -- the defects of issue 14, each shown on the code path the evaluator takes -------------------------------------
from types import SimpleNamespace  # noqa: E402

from emoreason.data.schema import EmotionRecord, Vote  # noqa: E402
from emoreason.eval.metrics import METRIC_GROUPS, compute_metrics, reference_distribution  # noqa: E402


def record(rid, label, votes=None, distribution=None, **fields):
    votes = [Vote(rater=f"r{i}", emotion=v) for i, v in enumerate(votes or [])]
    return EmotionRecord(id=rid, audio=f"{rid}.wav", duration=1.0, corpus="t", split="test", label=label,
                         votes=votes, distribution=distribution or {}, **fields)


def item(rid, prediction=None, distribution=None, failed=False, style="cot", text=None):
    text = text if text is not None else (None if failed else f"<think>x</think><answer>{prediction}</answer>")
    return SimpleNamespace(record_id=rid, prediction=prediction, distribution=distribution, failed=failed,
                           final_text=text, style=style, total_samples=int(not failed),
                           valid_samples=int(prediction is not None))


def nearly_equal_rows(n=2000, seed=0):
    """Rows equal up to rounding, as voting strategies and annotator shares produce them (e.g. 1/3 computed two
    ways): scipy's jensenshannon takes the square root of a slightly negative sum on some of them."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 7, size=(n, 4)) + np.eye(4, dtype=int)[rng.integers(0, 4, n)]
    p = counts / counts.sum(1, keepdims=True)
    q = (counts * 0.1) / (counts * 0.1).sum(1, keepdims=True)
    return p, q


def test_js_divergence_is_never_nan_on_rows_equal_up_to_rounding():
    p, q = nearly_equal_rows()
    with np.errstate(invalid="ignore"):
        scipy_js = np.array([jensenshannon(a, b, base=2) for a, b in zip(p, q)])
    assert np.isnan(scipy_js).any(), "control: scipy gives NaN on some of these rows"
    out = load_metric("distribution_agreement").compute(predictions=p.tolist(), references=q.tolist())
    assert np.isfinite(out["js_divergence"]) and out["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    finite = ~np.isnan(scipy_js)
    rows = load_metric("distribution_agreement").compute(predictions=p[finite].tolist(),
                                                         references=q[finite].tolist())
    assert rows["js_divergence"] == pytest.approx(np.mean(scipy_js[finite] ** 2), abs=1e-15)


def test_reference_keeps_out_of_set_votes_in_the_denominator():
    labels = ("neutral", "happy", "sad", "angry")
    angry_frustrated = record("a", "angry", votes=["angry", "angry", "frustrated", "frustrated", "frustrated"])
    stored = record("b", "angry", distribution={"angry": 0.4, "frustrated": 0.6})
    from emoreason.data.labels import vote_distribution

    rule = vote_distribution(["angry"] * 2 + ["frustrated"] * 3, labels)
    assert reference_distribution(angry_frustrated, labels) == [rule[k] for k in labels] == [0.0, 0.0, 0.0, 0.4]
    assert reference_distribution(stored, labels) == pytest.approx([0.0, 0.0, 0.0, 0.4])
    unanimous = record("c", "angry", votes=["angry"] * 5)
    records = {r.id: r for r in (angry_frustrated, unanimous)}
    answers = [item("a", "angry", {"angry": 1.0}), item("c", "angry", {"angry": 1.0})]
    m = compute_metrics(answers, records, labels, ("distribution", "ambiguity", "multilabel"), ambiguity_bins=2,
                        min_group_count=1)
    # The split item is not scored as unanimous: JS > 0 on it, and it sits in the more ambiguous bin.
    assert m["distribution"]["js_divergence"] > 0.1 and m["distribution"]["outside_column"]
    assert m["ambiguity"]["by_group"]["high"]["entropy_range"][0] == pytest.approx(0.971, abs=1e-3)
    assert m["ambiguity"]["by_group"]["low"]["entropy_range"] == [0.0, 0.0]


def test_ece_does_not_count_failed_items_as_correct():
    labels = ("neutral", "happy", "sad", "angry")
    records = {f"r{i}": record(f"r{i}", "neutral") for i in range(4)}  # the reference is the suite's first label
    failed = [item(f"r{i}", failed=True) for i in range(4)]
    m = compute_metrics(failed, records, labels, ("calibration", "classification"))
    assert m["classification"]["accuracy"] == 0.0
    assert all(row["accuracy"] in (None, 0.0) for row in m["calibration"]["reliability"])
    assert m["calibration"]["ece"] == pytest.approx(0.25)  # confidence 1/4, never correct


def test_macro_f1_averages_over_the_suite_label_set():
    labels = ["neutral", "happy", "sad", "angry"]
    refs = ["neutral", "neutral", "happy", "happy"]
    preds = ["neutral", "sad", "happy", "happy"]  # sad is predicted but never a reference
    out = load_metric("emotion_classification").compute(predictions=preds, references=refs, labels=labels)
    assert out["macro_f1"] == pytest.approx(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))
    assert out["macro_f1"] < f1_score(refs, preds, labels=["neutral", "happy"], average="macro")
    assert out["labels_without_references"] == ["sad", "angry"]


def test_group_gaps_leave_out_groups_below_the_minimum():
    refs = ["happy"] * 21
    preds = ["happy"] * 10 + ["sad"] * 10 + ["sad"]
    groups = ["a"] * 10 + ["b"] * 10 + ["c"]
    out = load_metric("group_gap").compute(predictions=preds, references=refs, groups=groups, min_count=5)
    assert out["by_group"]["c"] == {"count": 1, "accuracy": 0.0, "balanced_accuracy": 0.0, "in_gap": False}
    assert out["groups_in_gap"] == 2 and out["worst_group"] == "b" and out["min_count"] == 5
    lone = load_metric("group_gap").compute(predictions=preds[:11], references=refs[:11],
                                            groups=["a"] * 10 + ["c"], min_count=5)
    assert lone["accuracy_gap"] is None  # one group left: no gap to state


def test_group_gap_minimum_reaches_the_report_metrics():
    labels = ("neutral", "happy", "sad", "angry")
    records = {f"r{i}": record(f"r{i}", "happy", gender="female" if i < 12 else "male") for i in range(13)}
    answers = [item(f"r{i}", "happy" if i < 12 else "sad", {"happy": 1.0}) for i in range(13)]
    m = compute_metrics(answers, records, labels, ("groups",), group_by=("gender",), min_group_count=10)
    assert m["groups"]["gender"]["accuracy_gap"] is None and not m["groups"]["gender"]["by_group"]["male"]["in_gap"]


def test_ambiguity_bins_are_populated():
    """The demo's shape: most clips unanimous, a few split. Fixed cut-offs put 1 of 48 in "high"."""
    labels = ("neutral", "happy", "sad", "angry")
    records, answers = {}, []
    for i in range(48):
        votes = ["sad"] * 5 if i < 30 else ["sad"] * (2 + i % 3) + ["angry"] * (3 - i % 3) + ["happy"] * (i == 47) * 3
        records[f"r{i}"] = record(f"r{i}", "sad", votes=votes)
        answers.append(item(f"r{i}", "sad", {"sad": 1.0}))
    m = compute_metrics(answers, records, labels, ("ambiguity",), ambiguity_bins=3, min_group_count=10)
    amb = m["ambiguity"]
    counts = [amb["by_group"][b]["count"] for b in amb["bin_order"]]
    assert sum(counts) == 48 and min(counts) >= 10 and len(counts) >= 2
    assert amb["binning"]["counts"] == counts and amb["binning"]["min_count"] == 10
    ranges = [amb["by_group"][b]["entropy_range"] for b in amb["bin_order"]]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # ordered, ties never split


def test_ccc_is_not_advertised_without_a_producer():
    from emoreason.eval.suite import DEFAULT_METRICS

    assert "vad" not in METRIC_GROUPS and "vad" not in DEFAULT_METRICS
    with pytest.raises(FileNotFoundError):
        load_metric("ccc")
    repo = Path(__file__).resolve().parents[1]
    for suite in (repo / "eval" / "suites").glob("*.yaml"):
        assert "vad" not in suite.read_text(), suite


def test_literature_worked_example_through_the_reference_path():
    """The all-inclusive rule and the 1/C rule (Chou et al., ICASSP 2022; the ambiguous-emotion TTS benchmark):
    votes A, S, S, N, A over N, A, S, H give shares 0.2, 0.4, 0.4, 0 and multi-labels 0, 1, 1, 0."""
    labels = ("neutral", "angry", "sad", "happy")
    rec = record("x", "angry", votes=["angry", "sad", "sad", "neutral", "angry"])
    assert reference_distribution(rec, labels) == pytest.approx([0.2, 0.4, 0.4, 0.0])
    # Through the evaluator: a prediction equal to the reference scores JS 0 and multi-label F1 1; the presence
    # vector the multilabel metric reads is 0, 1, 1, 0.
    from emoreason.eval.metrics import MetricInputs

    inputs = MetricInputs([item("x", "angry", {"neutral": 0.2, "angry": 0.4, "sad": 0.4})], {"x": rec}, labels)
    assert inputs.ref_dists == [pytest.approx([0.2, 0.4, 0.4, 0.0])] and not inputs.has_outside
    presence = (np.asarray(inputs.ref_dists) > 1 / len(labels)).astype(int).tolist()
    assert presence == [[0, 1, 1, 0]]
    m = compute_metrics(inputs.items, {"x": rec}, labels, ("distribution", "multilabel"))
    assert m["distribution"]["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert m["multilabel"]["samples_f1"] == 1.0
    wrong = compute_metrics([item("x", "angry", {"angry": 0.5, "happy": 0.5})], {"x": rec}, labels, ("multilabel",))
    assert wrong["multilabel"]["samples_f1"] == pytest.approx(2 * 1 / (2 + 1 + 1))  # tp 1, fp 1 (happy), fn 1 (sad)


def test_metric_modules_are_found_in_the_installed_package_from_any_directory(tmp_path, monkeypatch):
    import emoreason.eval
    from emoreason.eval.metrics import metrics_dir

    monkeypatch.chdir(tmp_path)  # no eval/ folder here: the package's own copy must be found
    monkeypatch.delenv("EMOREASON_METRICS_DIR", raising=False)
    folder = metrics_dir()
    assert folder == Path(emoreason.eval.__file__).parent / "metric_modules"
    shipped = {"emotion_classification", "multilabel_f1", "distribution_agreement", "calibration", "group_gap",
               "reasoning_quality"}
    assert {p.parent.name for p in folder.glob("*/*.py") if p.stem == p.parent.name} == shipped
    out = load_metric.__wrapped__("group_gap").compute(predictions=["sad"], references=["sad"], groups=["a"])
    assert out["by_group"]["a"]["accuracy"] == 1.0


# -- issue 25: consistency read like everything else; R^2 undefined on constant references ---------------------------
@pytest.mark.parametrize("think,answer,consistent", [
    ("The pitch is low and the pace slow: she sounds sad, not angry.", "sad", True),
    ("It is sadness rather than anger.", "sad", True),
    ("She sounds angry rather than sad.", "sad", False),
    ("The voice is loud, so angry... no, it is sad.", "angry", False),
    ("The pitch is high; the other cues are unremarkable, so happy.", "happy", True),
    ("Is she angry? The voice is soft and slow, so sad.", "sad", True),
    ("She sounds sad; the other cues are unremarkable.", "sad", True),  # "other" is not an emotion here
    ('She says "I am so happy" but her voice is low and slow: sad.', "sad", True),
])
def test_consistency_reads_the_emotion_the_rationale_argues_for(think, answer, consistent):
    text = f"<think>{think}</think><answer>{answer}</answer>"
    out = load_metric("reasoning_quality").compute(predictions=[text], references=[answer], labels=LABELS)
    assert out["format_validity"] == 1.0 and out["consistency"] == float(consistent)


def test_consistency_and_the_cue_reader_are_one_reader():
    from emoreason.data.cues import argued_emotion

    module = load_metric("reasoning_quality")
    text = "<think>Quiet and slow, sad, not angry.</think><answer>sad</answer>"
    assert argued_emotion("Quiet and slow, sad, not angry.") == "sad"
    assert module.compute(predictions=[text], references=["sad"], labels=LABELS)["consistency"] == 1.0


@pytest.mark.parametrize("reference", [[1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.1, 0.1], [2, 2, 2]])
def test_r2_is_undefined_with_its_reason_when_the_references_do_not_vary(reference):
    out = load_metric("distribution_agreement").compute(predictions=[[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]] * 3,
                                                        references=[reference] * 6)
    assert out["r2"] is None and "same share" in out["r2_undefined"]
    assert np.isfinite(out["js_divergence"])
    varied = load_metric("distribution_agreement").compute(predictions=[[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]],
                                                           references=[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    assert varied["r2"] == pytest.approx(r2_score([0.1, 0.8, 0.1, 0.7, 0.2, 0.1], [0.2, 0.5, 0.3, 0.6, 0.2, 0.2]))
    assert "r2_undefined" not in varied
