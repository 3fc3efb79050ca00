"""Bootstrap intervals and paired tests (emoreason.eval.intervals) against closed forms and scipy, and the clip
statistics against the metric modules they stand for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emoreason.eval.clips import STATISTICS, columns
from emoreason.eval.intervals import (bootstrap_interval, mcnemar, paired_difference, resample_counts,
                                      wilson_interval)


def accuracy_columns(correct: np.ndarray) -> dict:
    scores = [{"ref": 0, "pred": 0 if c else 1, "correct": bool(c), "js": 0.0, "kl": 0.0, "bhattacharyya": 1.0,
               "brier": 0.0, "soft_brier": 0.0, "confidence": 1.0, "ece_bin": 9, "format_valid": True,
               "answered": True, "tokens": 1, "reasoned": False, "reasoned_valid": False, "consistent": False,
               "cue_claims": 0, "cue_contradicted": 0} for c in correct]
    return columns(scores, 2)


def test_resampling_counts_are_seeded_multinomial_draws():
    counts = resample_counts(50, draws=200, seed=3)
    assert counts.shape == (200, 50) and np.all(counts.sum(axis=1) == 50)
    assert np.array_equal(counts, resample_counts(50, draws=200, seed=3))
    assert not np.array_equal(counts, resample_counts(50, draws=200, seed=4))
    assert abs(counts.mean() - 1.0) < 1e-12 and abs(counts.var() - (1 - 1 / 50)) < 0.05  # Multinomial(n, 1/n)


@pytest.mark.parametrize("n,successes", [(64, 50), (64, 36), (200, 140), (500, 455), (1000, 512)])
def test_bootstrap_interval_of_accuracy_agrees_with_wilson(n, successes):
    """The percentile bootstrap of a proportion and Wilson's closed form agree within the bootstrap's own sampling
    error (the Monte Carlo error of a 2.5% quantile from 1,000 draws) plus the proportion's grid step 1/n."""
    correct = np.zeros(n, dtype=bool)
    correct[:successes] = True
    result = bootstrap_interval(STATISTICS["classification.accuracy"], accuracy_columns(correct), n, seed=7)
    low, high = wilson_interval(successes, n)
    se = math.sqrt(successes / n * (1 - successes / n) / n)
    # sd of the 2.5% quantile of 1,000 draws ~ sqrt(q(1-q)/B) / density at the quantile (normal approximation)
    mc_error = math.sqrt(0.025 * 0.975 / 1000) / (math.exp(-1.96 ** 2 / 2) / math.sqrt(2 * math.pi) / se)
    tolerance = 4 * mc_error + 1.0 / n + 0.3 * se  # Wilson is shifted towards 1/2 by O(z^2/n) relative to the bootstrap
    assert result["estimate"] == successes / n and result["n"] == n and result["draws"] == 1000
    assert abs(result["low"] - low) < tolerance, (result, (low, high), tolerance)
    assert abs(result["high"] - high) < tolerance, (result, (low, high), tolerance)


def test_wilson_interval_closed_form():
    # Newcombe (1998), Table I, example (81/263): 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert round(low, 4) == 0.2553 and round(high, 4) == 0.3662


@pytest.mark.parametrize("worse,better,same", [(0, 0, 10), (1, 6, 20), (3, 9, 5), (12, 11, 0), (10, 20, 34),
                                               (40, 60, 100)])
def test_mcnemar_matches_scipy(worse, better, same):
    from scipy.stats import binomtest, chi2

    a = np.array([True] * worse + [False] * better + [True] * same)
    b = np.array([False] * worse + [True] * better + [True] * same)
    result = mcnemar(a, b)
    assert result["right_to_wrong"] == worse and result["wrong_to_right"] == better
    discordant = worse + better
    if discordant == 0:
        assert result["p_value"] == 1.0
    elif discordant < 25:
        assert result["method"] == "exact binomial"
        assert math.isclose(result["p_value"], binomtest(worse, discordant, 0.5).pvalue, rel_tol=1e-9)
    else:
        assert result["method"].startswith("chi-square")
        expected = chi2.sf((abs(worse - better) - 1) ** 2 / discordant, 1)
        assert math.isclose(result["p_value"], expected, rel_tol=1e-9)


def test_paired_difference_is_zero_for_identical_runs_and_signed_b_minus_a():
    rng = np.random.default_rng(0)
    a = rng.random(100) < 0.6
    same = paired_difference(STATISTICS["classification.accuracy"], accuracy_columns(a), accuracy_columns(a), 100)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p_value"] == 1.0
    b = a.copy()
    b[~a] = True  # B fixes every clip A got wrong
    better = paired_difference(STATISTICS["classification.accuracy"], accuracy_columns(a), accuracy_columns(b), 100)
    assert better["difference"] == pytest.approx(1 - a.mean()) and better["low"] > 0 and better["p_value"] < 0.01
    # pairing: three fixed clips are a small, certain gain; unpaired intervals of the two runs would overlap widely
    c = a.copy()
    c[np.flatnonzero(~a)[:3]] = True
    paired = paired_difference(STATISTICS["classification.accuracy"], accuracy_columns(a), accuracy_columns(c), 100)
    alone = bootstrap_interval(STATISTICS["classification.accuracy"], accuracy_columns(a), 100)
    assert paired["difference"] == pytest.approx(0.03) and paired["low"] >= 0
    assert paired["high"] - paired["low"] < 0.5 * (alone["high"] - alone["low"])


def test_ratio_statistics_skip_resamples_where_they_are_undefined():
    scores = accuracy_columns(np.array([True, False, True]))
    scores["cue_claims"] = np.array([0.0, 0.0, 2.0])
    scores["cue_contradicted"] = np.array([0.0, 0.0, 1.0])
    result = bootstrap_interval(STATISTICS["reasoning.cue_hallucination_rate"], scores, 3, draws=500)
    assert result["estimate"] == 0.5 and 0 < result["defined_draws"] < 500  # (3 choose none of clip 3) ~ 30%
