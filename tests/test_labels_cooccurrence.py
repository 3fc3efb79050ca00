"""Labels: the all-inclusive soft label, the 1/C rule on worked examples, entropy, the co-occurrence matrix."""

from __future__ import annotations

import math

import pytest

from emoreason.data.labels import consensus_label, cooccurrence_matrix, entropy, multi_label, vote_distribution


def test_one_over_c_rule_worked_examples():
    # 5 raters, 4 classes (1/C = 0.25): angry 3/5 = 0.6 and sad 2/5 = 0.4 are present, the rest absent.
    dist = vote_distribution(["angry", "angry", "angry", "sad", "sad"], ["neutral", "happy", "sad", "angry"])
    assert multi_label(dist) == ["sad", "angry"]
    # 4 raters split 2/1/1 over 4 classes: 0.5 > 0.25 present; 0.25 is not *above* 1/C.
    dist = vote_distribution(["happy", "happy", "sad", "neutral"], ["neutral", "happy", "sad", "angry"])
    assert multi_label(dist) == ["happy"]
    # Same votes seen in an 8-class space (1/C = 0.125): all three voted emotions are present.
    assert multi_label(dist, num_classes=8) == ["neutral", "happy", "sad"]
    # A vote outside the label set still counts in the denominator (all-inclusive rule).
    dist = vote_distribution(["angry", "angry", "frustrated", "frustrated"], ["angry", "sad"])
    assert dist == {"angry": 0.5, "sad": 0.0} and multi_label(dist, num_classes=4) == ["angry"]


def test_consensus_and_entropy():
    assert consensus_label({"angry": 0.6, "sad": 0.4}) == "angry"
    assert consensus_label({"angry": 0.5, "sad": 0.5}) is None
    assert entropy({"angry": 1.0}) == 0.0
    assert math.isclose(entropy({"angry": 0.5, "sad": 0.5}), 1.0)


def test_cooccurrence_from_training_votes():
    clips = [["angry", "angry", "frustrated"], ["angry", "sad"], ["angry"], ["sad", "sad", None], ["happy"]]
    result = cooccurrence_matrix(clips, ["angry", "sad", "frustrated", "happy"])
    counts = result["counts"]
    assert counts[0] == [3, 1, 1, 0]  # angry: 3 clips; with sad in 1, with frustrated in 1, never with happy
    assert counts[1][1] == 2 and counts[3][3] == 1
    assert result["conditional"][0][1] == pytest.approx(1 / 3)
    assert result["conditional"][2][0] == 1.0  # every clip with frustrated also had angry
    assert result["penalty"][0][0] == 0.0 and result["penalty"][0][3] == 1.0
    assert result["penalty"][2][0] == 0.0  # confusing frustrated with angry costs nothing here
    assert result["clips"] == 5
    # The matrix is symmetric in counts
    assert all(counts[i][j] == counts[j][i] for i in range(4) for j in range(4))
