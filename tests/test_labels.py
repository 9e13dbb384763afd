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
    for source in ("probe_pseudo", "logit_pseudo"):
        with pytest.raises(ConfigError, match=rf"student\.label_sources: \['{source}'\] .* probe\.label_pool=true"):
            load("configs/default.yaml", [f"student.label_sources=[{source}]"])
    cfg = load("configs/default.yaml", ["student.label_sources=[gold, probe_pseudo]", "probe.label_pool=true",
                                        "data.train_fraction=0.1"])
    assert cfg.student.label_sources == ("gold", "probe_pseudo")


def test_mixes_train_on_the_teacher_or_probe_labels_with_a_gold_term():
    from engine import labels

    answer, n_choices = np.array([0, 2]), np.array([3, 4])
    logp = np.log(np.array([[0.2, 0.7, 0.1, 1e-9], [0.1, 0.1, 0.1, 0.7]]))
    probe = np.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.6, 0.1]])
    kw = dict(answer=answer, n_choices=n_choices, teacher_logp=logp, probe_probs=probe)
    np.testing.assert_allclose(labels.make_targets("gold+logit", **kw), labels.make_targets("logit", **kw))
    np.testing.assert_allclose(labels.make_targets("gold+probe", **kw), labels.make_targets("probe", **kw))
    assert labels.loss_alpha("gold+logit", 1.0, 0.5) == 0.5 and labels.loss_alpha("gold+probe", 1.0, 0.3) == 0.3
    assert labels.loss_alpha("probe", 1.0, 0.5) == 1.0 and labels.loss_alpha("logit_pseudo", 0.8, 0.5) == 0.8
    assert [labels.base_source(s) for s in labels.SOURCES] == ["gold", "logit", "probe", "logit", "probe", "probe",
                                                                "logit"]
    with pytest.raises(ValueError, match="label source"):
        labels.loss_alpha("teacher", 1.0, 0.5)


def test_logit_pseudo_puts_the_teachers_own_labels_on_the_pool():
    """The fair baseline of probe_pseudo: the same gold questions and pool, the teacher's labels there."""
    from engine import labels

    answer, n_choices = np.array([1]), np.array([4])
    pool_logp = np.log(np.array([[0.1, 0.2, 0.7, 1.0], [0.5, 0.25, 0.25, 1.0]]))  # the 4th choice is absent
    pool_n = np.array([3, 3])
    pool_probs = labels.logit_targets(pool_logp, pool_n)
    targets, used = pseudo_labelled(answer, n_choices, pool_probs, pool_n)
    np.testing.assert_allclose(targets[0], [0, 1, 0, 0])
    np.testing.assert_allclose(targets[1:], [[0.1, 0.2, 0.7, 0], [0.5, 0.25, 0.25, 0]], atol=1e-6)
    np.testing.assert_array_equal(used, [1, 2, 0])  # the pool's answers are the teacher's argmax, never gold


def test_a_new_label_source_is_one_entry(monkeypatch):
    """One `LabelSource` in `engine.labels.SOURCES`: the config's checks, the label making and the loss
    weight all follow it (here a semi-supervised mix of the probe's labels with a gold term)."""
    from engine import labels
    from engine.config import from_dict

    entry = labels.LabelSource("gold+probe_pseudo", "probe", "gold term, probe labels, pool too", mix=True, pseudo=True)
    monkeypatch.setitem(labels.SOURCES, entry.name, entry)
    cfg = from_dict({"data": {"train_fraction": 0.5}, "probe": {"label_pool": True},
                     "student": {"label_sources": ["gold", "gold+probe_pseudo"]},
                     "bench": {"sources": ["gold", "gold+probe_pseudo"]}})
    assert cfg.student.label_sources == ("gold", "gold+probe_pseudo")
    with pytest.raises(ConfigError, match=r"student\.label_sources: \['gold\+probe_pseudo'\] train on the unlabelled pool"):
        from_dict({"student": {"label_sources": ["gold+probe_pseudo"]}})
    assert labels.loss_alpha(entry.name, 1.0, 0.4) == 0.4 and labels.base_source(entry.name) == "probe"
    answer, n = np.array([0, 1]), np.array([3, 2])
    probs = np.array([[0.2, 0.5, 0.3], [0.9, 0.1, 0.0]])
    np.testing.assert_allclose(labels.make_targets(entry.name, answer=answer, n_choices=n, probe_probs=probs),
                               labels.make_targets("probe", answer=answer, n_choices=n, probe_probs=probs))
    teacher = labels.LabelSource("teacher_only", "logit", "the teacher's labels")
    monkeypatch.setitem(labels.SOURCES, teacher.name, teacher)
    with pytest.raises(ConfigError, match=r"extract\.teacher_scores: the label sources \['teacher_only'\] need"):
        from_dict({"extract": {"teacher_scores": False}, "student": {"label_sources": ["teacher_only"]}})
