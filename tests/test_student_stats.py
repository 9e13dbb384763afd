"""The student report's statistics on synthetic data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.metrics import bootstrap_accuracy, paired_difference


def test_bootstrap_interval_matches_the_binomial_one():
    rng = np.random.default_rng(0)
    correct = rng.random(2000) < 0.6
    acc, lo, hi = bootstrap_accuracy(correct, n_boot=4000)
    half = 1.96 * math.sqrt(acc * (1 - acc) / len(correct))
    assert acc == pytest.approx(correct.mean())
    assert lo == pytest.approx(acc - half, abs=0.004) and hi == pytest.approx(acc + half, abs=0.004)
    assert bootstrap_accuracy([True] * 10) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_accuracy([]))


def test_paired_difference_resolves_what_unpaired_intervals_cannot():
    """Two students that agree on most questions: a 2-point difference is invisible to two separate
    intervals (each about +-3 points) but resolved by pairing on the same questions."""
    rng = np.random.default_rng(1)
    n = 1000
    b = rng.random(n) < 0.5
    a = b.copy()
    flip = rng.choice(np.flatnonzero(~b), 25, replace=False)  # A right where B was wrong on 25 questions
    a[flip] = True
    back = rng.choice(np.flatnonzero(b), 5, replace=False)  # and wrong where B was right on 5
    a[back] = False
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(0.02) and (d["only_a"], d["only_b"]) == (25, 5)
    assert 0 < d["lo"] < 0.02 < d["hi"]
    from scipy.stats import binomtest

    assert d["p_mcnemar"] == pytest.approx(binomtest(25, 30, 0.5).pvalue) and d["p_mcnemar"] < 0.01
    _, lo_a, _ = bootstrap_accuracy(a)
    _, _, hi_b = bootstrap_accuracy(b)
    assert lo_a < hi_b  # the separate intervals overlap
    same = paired_difference(b, b)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["p_mcnemar"] == 1.0
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(a, b[:10])
