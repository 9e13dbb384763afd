"""Semi-supervised labels: gold on the labelled questions, probe predictions on the pool, and the pool's
withheld gold never an input."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import ConfigError, load
from engine.labels import pseudo_labelled


def test_pseudo_labelled_gold_then_pool():
    answer, n_choices = np.array([1, 0]), np.array([3, 4])
    pool_probs = np.array([[0.2, 0.5, 0.3, 0.0], [0.1, 0.1, 0.1, 0.7]])
    pool_n = np.array([3, 4])
    targets, used = pseudo_labelled(answer, n_choices, pool_probs, pool_n)
    assert targets.shape == (4, 4) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[:2], [[0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(targets[2:], pool_probs, atol=1e-7)
    assert used.tolist() == [1, 0, 1, 3]  # gold, then the pool predictions' argmax
    hard, used_h = pseudo_labelled(answer, n_choices, pool_probs, pool_n, soft=False)
    np.testing.assert_array_equal(hard[2:], [[0, 1, 0, 0], [0, 0, 0, 1]])
    assert used_h.tolist() == used.tolist()
    # probabilities on absent choices are dropped and the row renormalised
    t, _ = pseudo_labelled(answer, n_choices, np.array([[0.2, 0.2, 0.2, 0.4]]), np.array([3]))
    np.testing.assert_allclose(t[2], [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)


def test_probe_pseudo_needs_the_pool():
    with pytest.raises(ConfigError, match=r"student\.label_sources: 'probe_pseudo' .* probe\.label_pool=true"):
        load("configs/default.yaml", ["student.label_sources=[probe_pseudo]"])
    cfg = load("configs/default.yaml", ["student.label_sources=[gold, probe_pseudo]", "probe.label_pool=true",
                                        "data.train_fraction=0.1"])
    assert cfg.student.label_sources == ("gold", "probe_pseudo")
