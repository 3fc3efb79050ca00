"""Categorical emotion recognition: weighted accuracy (WA), unweighted / balanced accuracy (UA), macro and weighted F1,
and the confusion matrix.

Predictions that are not in ``labels`` (invalid or failed answers, passed as any other string, e.g. "<invalid>")
count as wrong: they lower every score and appear in the confusion matrix's extra "invalid" column.

Macro and weighted F1 average over ``labels`` (the suite's label set), not over the classes that happen to occur in
the references: a label the model predicts but no reference has scores F1 0 and pulls the macro average down; a
label neither side has also scores 0 (scikit-learn's ``zero_division=0``) and is listed in
``labels_without_references`` so a reader can see it. The weighted average is unaffected by such labels (support 0).
UA (balanced accuracy) is the mean recall over the classes present in the references (recall is undefined otherwise).
"""

import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix
from sklearn.metrics import f1_score

_DESCRIPTION = "WA, UA, macro/weighted F1 and confusion matrix for emotion labels given as strings."
_KWARGS = """
Args:
    predictions: predicted labels (strings); anything outside `labels` is an invalid answer.
    references: reference labels (strings, all in `labels`).
    labels: the label set, in display order (default: sorted references).
Returns:
    accuracy (WA), balanced_accuracy (UA, mean recall over reference classes), macro_f1 and weighted_f1 (over
    `labels`), invalid_rate, confusion_matrix (rows: reference labels; columns: labels then "invalid"), labels,
    labels_without_references.
"""


class EmotionClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, labels=None):
        labels = list(labels) if labels is not None else sorted(set(references))
        invalid = "<invalid>"
        preds = [p if p in labels else invalid for p in predictions]
        present = [label for label in labels if label in set(references)]
        # Invalid answers are a predicted class the references never have; sklearn warns about it, by design here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            warnings.filterwarnings("ignore", message="A single label was found")
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            return self._scores(preds, references, labels, present, invalid)

    @staticmethod
    def _scores(preds, references, labels, present, invalid):
        matrix = confusion_matrix(references, preds, labels=labels + [invalid])[: len(labels)]
        return {
            "accuracy": float(accuracy_score(references, preds)),
            "balanced_accuracy": float(balanced_accuracy_score(references, preds)) if present else 0.0,
            "macro_f1": float(f1_score(references, preds, labels=labels, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(references, preds, labels=labels, average="weighted", zero_division=0)),
            "invalid_rate": float(np.mean([p == invalid for p in preds])) if preds else 0.0,
            "confusion_matrix": matrix.tolist(),
            "labels": labels,
            "labels_without_references": [label for label in labels if label not in present],
        }
