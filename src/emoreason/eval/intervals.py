"""Uncertainty of the report's figures: bootstrap intervals over clips, and paired tests between two runs.

A metric here is a *statistic of weighted per-clip columns* (see :mod:`emoreason.eval.clips`): resampling clips with
replacement is the same as giving each clip a count drawn from a multinomial, so one matrix of counts
(``draws x clips``) resamples every metric at once, and the same matrix applied to two runs over the same clips is
the paired bootstrap. The full-sample value of each statistic is the metric module's own figure (the report checks
that before it writes an interval).

- :func:`bootstrap_interval`: percentile interval, clips resampled, seeded (1,000 draws and 95% by default).
- :func:`wilson_interval`: the closed form for a proportion, what the bootstrap of accuracy must agree with.
- :func:`mcnemar`: the paired test for accuracy: exact binomial on the discordant clips when they are few (< 25),
  else chi-square with continuity correction.
- :func:`paired_difference`: B - A with a paired-bootstrap interval and a two-sided bootstrap p-value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

DEFAULT_DRAWS = 1000
DEFAULT_LEVEL = 0.95
EXACT_MCNEMAR_BELOW = 25  # discordant clips under which the chi-square approximation is poor

Columns = Mapping[str, np.ndarray]
# weights (draws x clips) and the per-clip columns -> one value per draw (NaN where undefined, e.g. 0/0)
Statistic = Callable[[np.ndarray, Columns], np.ndarray]


def resample_counts(n: int, draws: int = DEFAULT_DRAWS, seed: int = 0) -> np.ndarray:
    """``draws x n`` counts: how often each clip appears in each bootstrap resample of the n clips."""
    if n <= 0:
        return np.zeros((draws, 0))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(draws, n))
    offsets = (np.arange(draws) * n)[:, None]
    return np.bincount((picks + offsets).ravel(), minlength=draws * n).reshape(draws, n).astype(np.float64)


def _percentiles(values: np.ndarray, level: float) -> tuple[float | None, float | None, int]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None, 0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high), int(finite.size)


def estimate(statistic: Statistic, columns: Columns, n: int) -> float | None:
    value = float(statistic(np.ones((1, n)), columns)[0])
    return value if math.isfinite(value) else None


def bootstrap_interval(statistic: Statistic, columns: Columns, n: int, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                       level: float = DEFAULT_LEVEL, counts: np.ndarray | None = None) -> dict:
    """The statistic on all n clips and its percentile bootstrap interval. ``defined_draws`` says in how many
    resamples the statistic existed (a ratio can be 0/0 in a resample)."""
    counts = resample_counts(n, draws, seed) if counts is None else counts
    low, high, defined = _percentiles(statistic(counts, columns), level)
    return {"estimate": estimate(statistic, columns, n), "low": low, "high": high, "n": n, "level": level,
            "draws": int(counts.shape[0]), "defined_draws": defined, "seed": seed}


def wilson_interval(successes: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927)."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(1.0 - (1.0 - level) / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """McNemar's test of equal accuracy on paired clips. ``a_to_b_wrong``: right under A, wrong under B."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    worse, better = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = worse + better
    if discordant == 0:
        p, method = 1.0, "exact binomial"
    elif discordant < EXACT_MCNEMAR_BELOW:
        k = min(worse, better)
        tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2.0 ** discordant
        p, method = min(1.0, 2.0 * tail), "exact binomial"
    else:
        from scipy.stats import chi2

        statistic = (abs(worse - better) - 1.0) ** 2 / discordant
        p, method = float(chi2.sf(statistic, 1)), "chi-square, continuity-corrected"
    return {"right_to_wrong": worse, "wrong_to_right": better, "discordant": discordant, "p_value": p,
            "method": method, "n": int(a.size)}


def paired_difference(statistic: Statistic, columns_a: Columns, columns_b: Columns, n: int, *,
                      draws: int = DEFAULT_DRAWS, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    """B minus A on the same n clips: the difference, its paired-bootstrap interval (both runs resampled with the
    same clips) and the two-sided bootstrap p-value of no difference (twice the share of resampled differences on
    the far side of 0, at most 1)."""
    counts = resample_counts(n, draws, seed)
    diffs = statistic(counts, columns_b) - statistic(counts, columns_a)
    low, high, defined = _percentiles(diffs, level)
    a, b = estimate(statistic, columns_a, n), estimate(statistic, columns_b, n)
    finite = diffs[np.isfinite(diffs)]
    p = min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))) if finite.size else None
    return {"a": a, "b": b, "difference": (b - a) if a is not None and b is not None else None, "low": low,
            "high": high, "p_value": None if p is None else float(p), "n": n, "level": level, "draws": draws,
            "defined_draws": defined, "seed": seed, "test": "paired bootstrap"}
