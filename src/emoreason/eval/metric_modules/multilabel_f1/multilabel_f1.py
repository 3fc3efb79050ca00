"""Multi-label emotion F1 under the 1/C rule: an emotion is present when its share exceeds 1/C (C classes), for the
predicted distribution and the annotator distribution alike (Chou et al., "Exploiting annotators' typed description
of emotion perception to maximize utilization of ratings for speech emotion recognition", ICASSP 2022, use this rule
to turn vote distributions into multi-label targets).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_KWARGS = """
Args:
    predictions: predicted distributions, one list of C shares per item (label order fixed by the caller).
    references: annotator distributions in the same order.
Returns:
    micro_f1, macro_f1, samples_f1 (sklearn averages over the binary presence matrices).
"""


def presence(distributions):
    shares = np.asarray(distributions, dtype=np.float64)
    return (shares > 1.0 / shares.shape[1]).astype(int)


class MultilabelF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Multi-label F1 of emotion presence under the 1/C rule.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references):
        pred, ref = presence(predictions), presence(references)
        return {
            "micro_f1": float(f1_score(ref, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(ref, pred, average="macro", zero_division=0)),
            "samples_f1": float(f1_score(ref, pred, average="samples", zero_division=0)),
        }
