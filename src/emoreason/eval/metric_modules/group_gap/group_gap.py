"""Accuracy and balanced accuracy per group (gender, speaker, corpus, ambiguity bin...) and the gap between the best
and the worst group, the usual first fairness check for speech emotion recognition.
"""

import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.metrics import balanced_accuracy_score

_KWARGS = """
Args:
    predictions: predicted labels (strings; anything not among the references' labels counts as wrong).
    references: reference labels (strings).
    groups: the group of each item (strings), passed as a keyword.
    min_count: groups with fewer items are reported but left out of the gap (default 1; the evaluator passes the
        suite's `min_group_count`), so that one clip cannot set the gap. With fewer than two groups left the gap is
        None.
Returns:
    by_group: {group: {count, accuracy, balanced_accuracy, in_gap}}, accuracy_gap, balanced_accuracy_gap,
    worst_group, best_group, min_count, groups_in_gap.
"""


class GroupGap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Per-group accuracy and the best-worst gap.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, groups=None, min_count=1):
        if groups is None or len(groups) != len(predictions):
            raise ValueError("group_gap needs `groups`, one per prediction")
        # A small group may miss classes or hold only invalid answers; sklearn warns, the scores stay defined.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            warnings.filterwarnings("ignore", message="A single label was found")
            return self._by_group(predictions, references, groups, min_count)

    @staticmethod
    def _by_group(predictions, references, groups, min_count):
        preds, refs, groups = np.asarray(predictions), np.asarray(references), np.asarray(groups)
        by_group = {}
        for group in sorted(set(groups.tolist())):
            mask = groups == group
            by_group[group] = {
                "count": int(mask.sum()),
                "accuracy": float(accuracy_score(refs[mask], preds[mask])),
                "balanced_accuracy": float(balanced_accuracy_score(refs[mask], preds[mask])),
            }
        counted = {g: v for g, v in by_group.items() if v["count"] >= min_count}
        for group, stats in by_group.items():
            stats["in_gap"] = group in counted
        result = {"by_group": by_group, "accuracy_gap": None, "balanced_accuracy_gap": None,
                  "worst_group": None, "best_group": None, "min_count": int(min_count),
                  "groups_in_gap": len(counted)}
        if len(counted) >= 2:
            ranked = sorted(counted, key=lambda g: counted[g]["accuracy"])
            result.update(
                accuracy_gap=counted[ranked[-1]]["accuracy"] - counted[ranked[0]]["accuracy"],
                balanced_accuracy_gap=max(v["balanced_accuracy"] for v in counted.values())
                - min(v["balanced_accuracy"] for v in counted.values()),
                worst_group=ranked[0], best_group=ranked[-1],
            )
        return result
