"""Agreement between predicted emotion distributions and the annotators' vote distribution.

Jensen-Shannon divergence (base 2, in [0, 1]; the square of scipy's ``jensenshannon`` distance, computed from the
relative entropies directly and clipped at 0: scipy takes the square root of a sum that rounding can make slightly
negative for nearly identical rows, which gives NaN), KL divergence
KL(annotators || prediction) in nats with ``epsilon`` added to the prediction before renormalising (so that a
prediction that gives zero to a voted emotion is penalised, not infinite), Bhattacharyya coefficient (1 = identical),
and R^2 of the predicted shares against the annotator shares (sklearn ``r2_score`` over all item x class cells).

R^2 divides by the variance of the reference cells. When every cell holds the same share (every reference row the
same uniform distribution) that variance is zero up to float noise, and dividing by the noise gave about -3e31:
then ``r2`` is None and ``r2_undefined`` says why.
"""

import datasets
import evaluate
import numpy as np
from scipy.special import rel_entr
from scipy.stats import entropy
from sklearn.metrics import r2_score

_KWARGS = """
Args:
    predictions: predicted distributions (lists of C non-negative shares; renormalised).
    references: annotator distributions in the same label order.
    epsilon: smoothing added to predictions for KL (default 1e-6).
Returns:
    js_divergence, kl_divergence, bhattacharyya, r2 (means over items; r2 over all cells; None when the reference
    cells do not vary, with the reason in r2_undefined).
"""
CONSTANT_TOLERANCE = 1e-9  # reference cells closer than this to each other are one value: R^2 is undefined


def normalise(rows):
    rows = np.asarray(rows, dtype=np.float64)
    totals = rows.sum(axis=1, keepdims=True)
    uniform = np.full_like(rows, 1.0 / rows.shape[1])
    return np.where(totals > 0, rows / np.where(totals > 0, totals, 1.0), uniform)


def js_divergence(pred, ref):
    """Row-wise JS divergence in bits of normalised rows, in [0, 1] (rounding can push the sum out by ~1e-16)."""
    mid = (pred + ref) / 2.0
    js = (rel_entr(pred, mid).sum(axis=1) + rel_entr(ref, mid).sum(axis=1)) / (2.0 * np.log(2.0))
    return np.clip(js, 0.0, 1.0)


class DistributionAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="JS divergence, KL, Bhattacharyya coefficient and R^2 against annotator distributions.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references, epsilon=1e-6):
        pred, ref = normalise(predictions), normalise(references)
        js = js_divergence(pred, ref)
        smoothed = normalise(pred + epsilon)
        kl = np.array([entropy(q, p) for p, q in zip(smoothed, ref)])
        bc = np.sqrt(pred * ref).sum(axis=1)
        result = {
            "js_divergence": float(js.mean()),
            "kl_divergence": float(kl.mean()),
            "bhattacharyya": float(bc.mean()),
        }
        if ref.size == 0 or np.ptp(ref) <= CONSTANT_TOLERANCE:
            result["r2"] = None
            result["r2_undefined"] = ("every reference cell holds the same share: R^2 divides by their variance, "
                                      "which is zero")
        else:
            result["r2"] = float(r2_score(ref.ravel(), pred.ravel()))
        return result
