"""The penalisation (label co-occurrence) matrix gives partial credit for confusions the annotators themselves make:
the logic in data/labels.py, the `cooccurrence` reward a recipe names, on a hand-made matrix."""

from __future__ import annotations

import json

import pytest

from emoreason.data.labels import LabelError, confusion_credit, cooccurrence_matrix, load_cooccurrence
from emoreason.train.rewards import get_reward_funcs

# Hand-made votes: angry and frustrated are often heard together, angry and happy never.
CLIPS = [["angry", "frustrated"], ["angry", "frustrated"], ["angry"], ["angry", "sad"], ["happy"], ["frustrated"]]
LABELS = ["angry", "frustrated", "sad", "happy"]


def _answer(label: str) -> str:
    return f"<think>The voice is loud and fast, pitch high.</think><answer>{label}</answer>"


def test_credit_follows_how_often_raters_mix_two_emotions():
    matrix = cooccurrence_matrix(CLIPS, LABELS)
    # angry was voted on 4 clips; frustrated joined on 2 of them, sad on 1, happy on none
    assert confusion_credit("angry", "angry", matrix) == 1.0
    assert confusion_credit("frustrated", "angry", matrix) == pytest.approx(0.5 * 2 / 4)
    assert confusion_credit("sad", "angry", matrix) == pytest.approx(0.5 * 1 / 4)
    assert confusion_credit("happy", "angry", matrix) == 0.0
    assert confusion_credit("frustrated", "angry", matrix, partial_scale=1.0) == pytest.approx(0.5)
    # asymmetric: frustrated was voted on 3 clips, angry joined on 2
    assert confusion_credit("angry", "frustrated", matrix, partial_scale=1.0) == pytest.approx(2 / 3)
    assert confusion_credit("surprised", "angry", matrix) == 0.0  # outside the matrix


def test_the_named_reward_reads_datagens_file_and_scores_completions(tmp_path):
    path = tmp_path / "cooccurrence.json"
    path.write_text(json.dumps(cooccurrence_matrix(CLIPS, LABELS)))
    (reward,) = get_reward_funcs(["cooccurrence"], {"cooccurrence": {"matrix": str(path), "partial_scale": 1.0}})
    assert reward.__name__ == "cooccurrence"
    completions = [_answer("angry"), _answer("frustrated"), _answer("happy"), "angry, no tags", _answer("angry")]
    scores = reward(completions=completions, label=["angry", "angry", "angry", "angry", None],
                    distribution=[None, None, None, None, None])
    assert scores == [1.0, pytest.approx(0.5), 0.0, 0.0, None]


def test_a_bad_matrix_is_a_clear_error(tmp_path):
    with pytest.raises(LabelError, match="does not exist"):
        load_cooccurrence(tmp_path / "missing.json")
    bad = cooccurrence_matrix(CLIPS, LABELS)
    bad["penalty"][0][0] = 0.3
    with pytest.raises(LabelError, match="diagonal"):
        load_cooccurrence(bad)
    with pytest.raises(LabelError, match="square"):
        load_cooccurrence({"labels": LABELS, "penalty": [[0.0]]})
    with pytest.raises(ValueError, match="cooccurrence"):
        get_reward_funcs(["cooccurrence"], {"cooccurrence": {"matrix": str(tmp_path / "missing.json")}})
