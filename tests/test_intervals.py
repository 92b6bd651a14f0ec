"""The intervals against independent recomputations (closed form, and scipy's binomial test inversion)."""

import math

import numpy as np
import pytest

from ffkv.analysis.intervals import agree, bootstrap, wilson, wilson_per_layer


def test_wilson_matches_the_closed_form_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 1000), (500, 1000)):
        low, high = wilson(k, n)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert math.isclose(low, ci.low, abs_tol=1e-9) and math.isclose(high, ci.high, abs_tol=1e-9)
        assert low <= k / n <= high
    assert wilson(0, 0) is None


def test_wilson_per_layer_keeps_missing_layers():
    out = wilson_per_layer([1, None, 0], [4, 3, 0])
    assert out[1] is None and out[2] is None and out[0] == wilson(1, 4)


def test_bootstrap_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 30), rng.normal(2.0, 1.0, 3000)
    a, b = bootstrap(small), bootstrap(large)
    assert a[0] < small.mean() < a[1] and b[0] < large.mean() < b[1]
    assert (b[1] - b[0]) < (a[1] - a[0]) / 5  # width ~ 1/sqrt(n): 10x the n -> 1/10 the width
    # the normal-theory interval of a mean is a recomputation the bootstrap must come close to
    se = large.std(ddof=1) / math.sqrt(large.size)
    assert abs((b[1] - b[0]) - 2 * 1.96 * se) < 0.2 * 2 * 1.96 * se
    med = bootstrap(large, "median")
    assert med[0] < np.median(large) < med[1]
    assert bootstrap([]) is None and bootstrap([5.0]) == [5.0, 5.0]
    assert bootstrap(small, seed=3) == bootstrap(small, seed=3)


def test_agree():
    assert agree([0.1, 0.2], 0.15) and not agree([0.1, 0.2], 0.25)
    assert agree([0.1, 0.2], 0.19, 0.4) and not agree([0.1, 0.2], 0.21, 0.4) and not agree(None, 0.1)
