"""Uncertainty of per-layer numbers: 95 % intervals for shares (Wilson score) and for statistics of a sample
(percentile bootstrap). Every per-layer array ``X`` of ``analysis.json`` that is a share of a sample or a
mean / median over sampled items has a sibling ``X_ci``: a list with one ``[low, high]`` (or ``null``) per layer.

Wilson rather than the normal approximation because many of our shares sit near 0 (agreement rates of 1 %
from a few hundred values), where p ± 1.96·sqrt(p(1-p)/n) runs below zero and is too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
"""The standard normal's 97.5 % quantile: two-sided 95 % intervals."""

BOOTSTRAP_RESAMPLES = 1000


def wilson(successes: float, n: float, z: float = Z95) -> list[float] | None:
    """The Wilson score interval [low, high] of a binomial share successes / n; None when n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # the ends are exact at k = 0 and k = n (rounding would otherwise leave the point itself outside)
    return [0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half)]


def bootstrap(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], np.ndarray] | str = "mean",
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval [low, high] of ``statistic`` ("mean", "median" or a function reducing the
    last axis of a [resamples, n] array) over the sample ``values``; None for an empty sample, the point itself
    for a sample of one."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    reduce = {"mean": lambda a: a.mean(axis=-1), "median": lambda a: np.median(a, axis=-1)}.get(statistic, statistic) \
        if isinstance(statistic, str) else statistic
    if x.size == 1:
        v = float(reduce(x[None, :])[0])
        return [v, v]
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, 256):  # [chunk, n] index draws: bounded memory for large samples
        stop = min(resamples, start + 256)
        stats[start:stop] = reduce(x[rng.integers(0, x.size, size=(stop - start, x.size))])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return [float(low), float(high)]


def wilson_per_layer(successes: Sequence[float | None], totals: Sequence[float | None]) -> list[list[float] | None]:
    """``X_ci`` for a per-layer share successes[l] / totals[l] (None where either is missing)."""
    return [None if s is None or n is None else wilson(s, n) for s, n in zip(successes, totals)]


def agree(interval: Sequence[float] | None, low: float, high: float | None = None) -> bool:
    """Whether an interval overlaps the range [low, high] (a point when ``high`` is None): the test a
    "reproduces" verdict applies to a number with its interval."""
    if interval is None:
        return False
    high = low if high is None else high
    return interval[0] <= high and interval[1] >= low
