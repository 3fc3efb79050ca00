"""Calibration of predicted emotion distributions: multi-class Brier score against the consensus label (sklearn's
``brier_score_loss`` with ``labels`` and ``scale_by_half=False``, scikit-learn >= 1.7), Brier score against the soft
annotator distribution, and expected calibration error (ECE) of the top prediction over equal-width confidence bins
(Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), with the per-bin table a reliability diagram
plots.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import brier_score_loss

_KWARGS = """
Args:
    predictions: predicted distributions (lists of C shares; renormalised).
    references: index of the consensus label in the same order.
    soft_references: optional annotator distributions (lists of C shares) for the soft Brier score.
    n_bins: ECE bins (default 10).
    predicted_labels: optional index of each item's answer (-1: no valid answer). When given, an item's
        confidence is the share its distribution gives its answer and it is correct only when that answer is the
        reference, so a failed item (uniform distribution, no answer) never counts as correct; without it the top
        prediction is the argmax of the distribution.
Returns:
    brier, soft_brier (if soft_references), ece, reliability: {bin_lower, bin_upper, confidence, accuracy, count}.
"""


def normalise(rows):
    rows = np.asarray(rows, dtype=np.float64)
    totals = rows.sum(axis=1, keepdims=True)
    return np.where(totals > 0, rows / np.where(totals > 0, totals, 1.0), 1.0 / rows.shape[1])


class Calibration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Brier score and expected calibration error with a reliability table.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, soft_references=None, n_bins=10, predicted_labels=None):
        probs = normalise(predictions)
        refs = np.asarray(references, dtype=int)
        classes = np.arange(probs.shape[1])
        # Unscaled (sum over classes, in [0, 2]) for every class count: sklearn's "auto" halves it for two classes,
        # which would put a 2-label suite on another scale than the soft Brier score below.
        result = {"brier": float(brier_score_loss(refs, probs, labels=classes, scale_by_half=False))}
        if soft_references is not None:
            soft = normalise(soft_references)
            result["soft_brier"] = float(np.mean(np.sum((probs - soft) ** 2, axis=1)))
        if predicted_labels is None:
            confidence = probs.max(axis=1)
            correct = (probs.argmax(axis=1) == refs).astype(float)
        else:
            answer = np.asarray(predicted_labels, dtype=int)
            if answer.shape != refs.shape:
                raise ValueError("predicted_labels needs one index (or -1) per prediction")
            answered = answer >= 0
            confidence = np.where(answered, probs[np.arange(len(refs)), np.where(answered, answer, 0)],
                                  probs.max(axis=1))
            correct = (answered & (answer == refs)).astype(float)
        edges = np.arange(n_bins + 1) / n_bins  # exactly b / n_bins (linspace gives 0.6000000000000001 for 6/10)
        # Bins are (lower, upper], the first one also taking confidence 0.
        which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        ece, table = 0.0, []
        for b in range(n_bins):
            mask = which == b
            count = int(mask.sum())
            conf = float(confidence[mask].mean()) if count else None
            acc = float(correct[mask].mean()) if count else None
            if count:
                ece += count / len(confidence) * abs(acc - conf)
            table.append({"bin_lower": float(edges[b]), "bin_upper": float(edges[b + 1]), "confidence": conf,
                          "accuracy": acc, "count": count})
        result["ece"] = float(ece)
        result["reliability"] = table
        return result
