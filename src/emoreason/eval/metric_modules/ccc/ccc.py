"""Concordance correlation coefficient (Lin, Biometrics 1989), the standard score for valence / arousal / dominance
regression in speech emotion recognition: 2 cov(x, y) / (var x + var y + (mean x - mean y)^2), population moments.
"""

import datasets
import evaluate
import numpy as np

_KWARGS = """
Args:
    predictions: predicted values (floats).
    references: reference values (floats).
Returns:
    ccc, pearson, mse.
"""


class CCC(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Concordance correlation coefficient.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        x = np.asarray(predictions, dtype=np.float64)
        y = np.asarray(references, dtype=np.float64)
        cov = np.mean((x - x.mean()) * (y - y.mean()))
        denominator = x.var() + y.var() + (x.mean() - y.mean()) ** 2
        pearson = cov / np.sqrt(x.var() * y.var()) if x.var() > 0 and y.var() > 0 else 0.0
        return {
            "ccc": float(2 * cov / denominator) if denominator > 0 else 0.0,
            "pearson": float(pearson),
            "mse": float(np.mean((x - y) ** 2)),
        }
