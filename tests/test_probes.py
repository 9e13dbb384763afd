"""Probes, cross-fitting, selection, calibration, metrics and labels on synthetic data; one Ray sweep.

Activations are Gaussian noise with a planted signal (a shift along one direction on the correct
choice's row, or a class mean per answer in letter mode). The module takes ~15-25 s on 2 cores, most
of it the Ray test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import check_estimator

from engine import labels as lb
from engine import probes as pr
from engine.config import ProbeConfig
from engine.metrics import accuracy, ece, nll, softmax_rows
from engine.sequences import Sequences
from engine.tasks import stratified_subset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Synthetic data


def make_seqs(mode: str, n_choices, answer) -> Sequences:
    n_choices, answer = np.asarray(n_choices, np.int64), np.asarray(answer, np.int64)
    q = len(answer)
    if mode == "letter":
        row_q, row_c = np.arange(q), np.zeros(q, np.int64)
    else:
        row_q = np.repeat(np.arange(q), n_choices)
        row_c = np.concatenate([np.arange(n) for n in n_choices])
    rows = len(row_q)
    return Sequences(
        mode=mode, ids=[np.zeros(1, np.int64)] * rows, start=np.zeros(rows, np.int64), row_question=row_q,
        row_choice=row_c, n_choices=n_choices, answer=answer,
        letter_ids=np.arange(int(n_choices.max())) if mode == "letter" else np.zeros(0, np.int64),
    )


def random_questions(q: int, rng, choices=(3, 4, 5)) -> tuple[np.ndarray, np.ndarray]:
    n = rng.choice(choices, size=q)
    return n, (rng.random(q) * n).astype(np.int64)


def planted(seqs: Sequences, dim: int, strength: float, rng) -> np.ndarray:
    """(rows, dim) noise; the gold row is shifted along e0 (per-choice) or by a class mean (letter)."""
    X = rng.standard_normal((seqs.n_rows, dim)).astype(np.float32)
    if strength == 0:
        return X
    if seqs.mode == "letter":
        # class means fixed across calls, so every split shares the same signal
        means = np.random.default_rng(1234).standard_normal((5, dim)) * strength / np.sqrt(dim) * 2
        return (X + means[seqs.answer[seqs.row_question]]).astype(np.float32)
    gold = seqs.row_choice == seqs.answer[seqs.row_question]
    X[gold, 0] += strength
    return X


def check_prob_rows(p: np.ndarray, n_choices: np.ndarray) -> None:
    present = np.arange(p.shape[1])[None, :] < n_choices[:, None]
    assert np.all(p[~present] == 0)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# make_probe, question_folds


def test_make_probe_is_an_sklearn_estimator():
    probe = make = pr.make_probe(0.5, 123, 7)
    params = make.get_params()
    assert params["logisticregression__C"] == 0.5 and params["logisticregression__max_iter"] == 123
    assert params["logisticregression__random_state"] == 7
    assert clone(probe).get_params()["logisticregression__C"] == 0.5
    # sklearn's Pipeline fits its steps in place (no clone without `memory`); that is its documented
    # design, and make_probe builds fresh steps on every call, so no fitted state is ever shared.
    in_place = "Pipeline fits its steps in place by design"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(
            pr.make_probe(1.0, 200, 0),
            expected_failed_checks={"check_estimators_overwrite_params": in_place,
                                    "check_dont_overwrite_parameters": in_place},
        )
    assert pr.make_probe(1.0, 200, 0).steps[1][1] is not pr.make_probe(1.0, 200, 0).steps[1][1]


def test_question_folds_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    answer = rng.integers(0, 4, size=203)
    f = pr.question_folds(answer, 5, seed=3)
    assert f.shape == (203,) and set(f.tolist()) == set(range(5))
    np.testing.assert_array_equal(f, pr.question_folds(answer, 5, seed=3))
    assert not np.array_equal(f, pr.question_folds(answer, 5, seed=4))
    sizes = np.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(4):
        per = np.bincount(f[answer == c], minlength=5)
        assert per.max() - per.min() <= 1, (c, per)
    with pytest.raises(ValueError):
        pr.question_folds(answer[:3], 5, 0)


# ---------------------------------------------------------------------------------------------
# Probes learn a planted signal


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_probe_learns_planted_signal(mode):
    rng = np.random.default_rng(1)
    n, a = random_questions(400, rng)
    seqs = make_seqs(mode, n, a)
    X = planted(seqs, 12, 3.0, rng)
    train, held = np.arange(300), np.arange(300, 400)
    probe = pr.fit_probe(X, seqs, train, C=1.0, max_iter=300, seed=0)
    p = pr.choice_probs(probe, X, seqs, held)
    assert p.shape == (100, 5)
    check_prob_rows(p, n[held])
    chance = float(np.mean(1.0 / n[held]))
    acc = accuracy(p, a[held])
    assert acc > chance + 0.35, (acc, chance)
    # all questions, in order, equal the per-question selection
    np.testing.assert_allclose(pr.choice_probs(probe, X, seqs)[held], p, atol=1e-12)
    # a selection in another order follows that order
    np.testing.assert_allclose(pr.choice_probs(probe, X, seqs, held[::-1]), p[::-1], atol=1e-12)


def test_letter_probe_missing_classes_in_fit():
    rng = np.random.default_rng(2)
    n, a = random_questions(200, rng)
    seqs = make_seqs("letter", n, a)
    X = planted(seqs, 8, 3.0, rng)
    fit_q = np.flatnonzero(a < 3)  # classes 3 and 4 never seen
    probe = pr.fit_probe(X, seqs, fit_q, C=1.0, max_iter=300, seed=0)
    assert list(probe.classes_) == [0, 1, 2]
    p = pr.choice_probs(probe, X, seqs)
    check_prob_rows(p, n)
    assert np.all(p[:, 3:] == 0)


@pytest.mark.parametrize("family", ["logreg", "conditional_logit", "mlp"])
def test_cross_fit_never_sees_own_question(monkeypatch, family):
    rng = np.random.default_rng(3)
    n, a = random_questions(60, rng)
    seqs = make_seqs("per_choice", n, a)
    X = planted(seqs, 6, 2.0, rng)
    subset = np.sort(rng.choice(60, size=45, replace=False))
    fits, preds = [], []
    real_fit, real_probs = pr.fit_probe, pr.choice_probs

    def spy_fit(X_rows, s, questions, *args, **kw):
        fits.append(np.asarray(questions).copy())
        return real_fit(X_rows, s, questions, *args, **kw)

    def spy_probs(probe, X_rows, s, questions=None):
        preds.append(np.asarray(questions).copy())
        return real_probs(probe, X_rows, s, questions)

    monkeypatch.setattr(pr, "fit_probe", spy_fit)
    monkeypatch.setattr(pr, "choice_probs", spy_probs)
    oof = pr.cross_fit(X, seqs, C=1.0, max_iter=200, folds=3, seed=0, questions=subset, family=family)
    assert oof.shape == (45, 5) and len(fits) == len(preds) == 3
    assert accuracy(oof, seqs.answer[subset]) > 0.6  # the planted signal is learnt by every family
    check_prob_rows(oof, n[subset])
    for fitted, predicted in zip(fits, preds):
        assert not set(fitted) & set(predicted)
        assert set(fitted) | set(predicted) == set(subset)  # only the selected questions are used
    labelled = np.concatenate(preds)
    assert sorted(labelled.tolist()) == sorted(subset.tolist())  # each exactly once


def test_cross_fit_cannot_memorise():
    """Pure-noise states, random answers: an in-sample fit memorises (~100%), OOF stays near chance."""
    rng = np.random.default_rng(4)
    q = 80
    seqs = make_seqs("letter", np.full(q, 4), rng.integers(0, 4, q))
    X = rng.standard_normal((q, 120)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = pr.fit_probe(X, seqs, None, C=1e4, max_iter=500, seed=0)
        in_sample = accuracy(pr.choice_probs(probe, X, seqs), seqs.answer)
        oof = pr.cross_fit(X, seqs, C=1e4, max_iter=500, folds=4, seed=0)
    assert in_sample > 0.95
    assert accuracy(oof, seqs.answer) < 0.5


def test_fit_and_score_and_fit_predict_overlap():
    rng = np.random.default_rng(5)
    n, a = random_questions(150, rng)
    seqs = make_seqs("per_choice", n, a)
    X = planted(seqs, 8, 3.0, rng)
    ev = make_seqs("per_choice", *random_questions(50, rng))
    Xe = planted(ev, 8, 3.0, rng)
    out = pr.fit_and_score(X, seqs, {"validation": (Xe, ev)}, 1.0, 200, 0, train_questions=np.arange(100))
    assert out["n_train"] == 100 and out["acc"]["validation"] > 0.7
    assert out["probs"]["validation"].shape == (50, ev.max_choices) and out["fit_seconds"] >= 0
    with pytest.raises(ValueError, match="overlap"):
        pr.fit_predict(X, seqs, np.arange(10), np.arange(5, 15), 1.0, 100, 0)


# ---------------------------------------------------------------------------------------------
# Selection and calibration


def test_best_result_uses_validation_only():
    results = [
        {"layer": 4, "C": 0.1, "val_acc": 0.50, "test_acc": 0.90},
        {"layer": 8, "C": 0.1, "val_acc": 0.60, "test_acc": 0.40},
        {"layer": 12, "C": 0.1, "val_acc": 0.55, "test_acc": 0.95},
    ]
    assert pr.best_result(results) is results[1]
    # test scores cannot move the choice: drop them, or swap them around
    assert pr.best_result([{k: v for k, v in r.items() if k != "test_acc"} for r in results])["layer"] == 8
    swapped = [dict(r, test_acc=1.0 - r["test_acc"]) for r in results]
    assert pr.best_result(swapped)["layer"] == 8
    # ties: smaller C first, then shallower layer
    ties = [{"layer": 8, "C": 1.0, "val_acc": 0.6, "test_acc": 0.9}, {"layer": 12, "C": 0.01, "val_acc": 0.6, "test_acc": 0.1},
            {"layer": 6, "C": 0.01, "val_acc": 0.6, "test_acc": 0.2}]
    assert (pr.best_result(ties)["layer"], pr.best_result(ties)["C"]) == (6, 0.01)


def test_temperature_fixes_overconfidence():
    rng = np.random.default_rng(6)
    q = 3000
    n = rng.choice([3, 4, 5], size=q)
    present = np.arange(5)[None, :] < n[:, None]
    z = np.where(present, rng.standard_normal((q, 5)) * 1.5, -np.inf)
    true_p = softmax_rows(z)
    answer = np.array([rng.choice(5, p=row) for row in true_p])
    over = softmax_rows(3.0 * z)  # over-confident by a factor 3
    T = pr.fit_temperature(over, answer)
    assert 2.4 < T < 3.6, T
    assert T == pytest.approx(pr.fit_temperature(3.0 * z, answer), rel=1e-2)  # logits give the same T
    cal = pr.apply_temperature(over, T)
    check_prob_rows(cal, n)
    assert nll(cal, answer) < nll(over, answer) - 0.05
    assert ece(cal, answer) < ece(over, answer) / 2
    np.testing.assert_array_equal(cal.argmax(1), over.argmax(1))
    np.testing.assert_allclose(pr.apply_temperature(over, 1.0), over, atol=1e-12)
    # already calibrated -> T near 1
    assert 0.8 < pr.fit_temperature(true_p, answer) < 1.25


# ---------------------------------------------------------------------------------------------
# Multi-layer candidates and the unlabelled pool


def _result(layer, val, test=0.5, family="logreg", C=0.1, combine=None, layers=None):
    return {"family": family, "combine": combine, "layer": layer, "layers": layers or [layer], "C": C,
            "val_acc": val, "test_acc": test, "fit_seconds": 1.0}


def test_best_result_with_multi_layer_candidates():
    single = [_result(layer, val) for layer, val in ((2, 0.6), (4, 0.7), (6, 0.65), (8, 0.5))]
    concat = _result(None, 0.75, test=0.1, combine="concat", layers=[4, 6])
    assert pr.best_result(single + [concat]) is concat
    assert pr.layers_of(concat) == (4, 6) and pr.layers_of({"layer": 3}) == (3,)
    # a tie goes to the single-layer probe (fewer layers); between kinds over the same layers, concat first
    tie, ens = dict(concat, val_acc=0.7), dict(concat, val_acc=0.7, combine="ensemble")
    assert pr.best_result([ens, tie] + single)["layer"] == 4
    assert pr.best_result([ens, tie]) is tie
    # the per-layer curve holds single-layer probes only
    assert [r["layer"] for r in pr.best_per_layer(single + [concat, ens])] == [2, 4, 6, 8]


def test_combine_members_by_validation_of_one_family_and_c():
    results = [_result(layer, val, test=1.0 - val) for layer, val in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.6), (5, 0.4))]
    results += [_result(5, 0.9, family="mlp"), _result(1, 0.95, C=1.0)]  # other family / C: not considered
    results += [_result(None, 0.99, combine="concat", layers=[1, 2])]  # multi-layer results: not considered
    assert pr.combine_members(results, 2, "logreg", 0.1) == [2, 3]  # 0.7, then the 0.6 tie -> shallower
    assert pr.combine_members(results, 3, "logreg", 0.1) == [2, 3, 4]
    swapped = [dict(r, test_acc=0.0) for r in results]  # test never moves the choice
    assert pr.combine_members(swapped, 3, "logreg", 0.1) == [2, 3, 4]
    for k, family in ((2, "mlp"), (6, "logreg"), (1, "logreg")):  # too few results, or k < 2
        with pytest.raises(ValueError, match="lower probe.combine_layers"):
            pr.combine_members(results, k, family, 0.1)


def test_ensemble_choice_probs_floor_and_absent():
    a = np.array([[0.7, 0.3, 0.0], [0.5, 0.25, 0.25]])
    b = np.array([[0.4, 0.6, 0.0], [0.0, 0.5, 0.5]])  # b underflowed to 0 on a present choice
    n = np.array([2, 3])
    out = pr.ensemble_choice_probs([a, b], n)
    check_prob_rows(out, n)
    geo = np.sqrt(a[0, :2] * b[0, :2])
    np.testing.assert_allclose(out[0, :2], geo / geo.sum())
    assert 0 < out[1, 0] < 1e-100  # floored, not vetoed to an all-absent row
    np.testing.assert_allclose(out[1, 1:], [0.5, 0.5], atol=1e-100)


def test_ensemble_result_needs_no_fit():
    rng = np.random.default_rng(11)
    val, test = (make_seqs("per_choice", *random_questions(q, rng)) for q in (30, 20))

    def member(layer):
        probs = {s: softmax_rows(np.where(np.arange(5) < seqs.n_choices[:, None], rng.standard_normal((seqs.n_questions, 5)), -np.inf))
                 for s, seqs in (("val", val), ("test", test))}
        return {"family": "logreg", "layer": layer, "C": 0.1, "val_probs": probs["val"], "test_probs": probs["test"],
                "fit_seconds": 2.0}

    members = [member(5), member(3)]
    r = pr.ensemble_result(members, val, test)
    assert r["combine"] == "ensemble" and r["layer"] is None and r["layers"] == [3, 5] and r["fit_seconds"] == 4.0
    want = pr.ensemble_choice_probs([m["val_probs"] for m in members], val.n_choices)
    np.testing.assert_allclose(r["val_probs"], want, rtol=1e-6)
    assert r["val_acc"] == accuracy(r["val_probs"], val.answer) and r["test_acc"] == accuracy(r["test_probs"], test.answer)


def _two_layer_data(q: int, seed: int):
    """Per-choice questions whose signal is split over layers 3 and 7 (half the shift in each)."""
    rng = np.random.default_rng(seed)
    seqs = make_seqs("per_choice", *random_questions(q, rng))
    return seqs, {3: planted(seqs, 6, 1.5, rng), 7: planted(seqs, 6, 1.5, rng), 9: planted(seqs, 6, 0.0, rng)}


def test_fit_predict_layers_each_kind():
    seqs, states = _two_layer_data(160, 12)
    fit_q, pred_q = np.arange(110), np.arange(110, 160)
    args = (seqs, fit_q, pred_q, 1.0, 200, 0)
    single = pr.fit_predict_layers(states, [7], None, *args)
    np.testing.assert_array_equal(single, pr.fit_predict(states[7], *args))
    concat = pr.fit_predict_layers(states, [3, 7], "concat", *args)
    np.testing.assert_array_equal(concat, pr.fit_predict(np.hstack([states[3], states[7]]), *args))
    ens = pr.fit_predict_layers(states, [3, 7], "ensemble", *args)
    want = pr.ensemble_choice_probs([pr.fit_predict(states[k], *args) for k in (3, 7)], seqs.n_choices[pred_q])
    np.testing.assert_allclose(ens, want)
    for p in (concat, ens):
        check_prob_rows(p, seqs.n_choices[pred_q])
        assert accuracy(p, seqs.answer[pred_q]) > float(np.mean(1.0 / seqs.n_choices[pred_q])) + 0.2
    for layers, combine in (([3, 7], None), ([3], "concat"), ([3, 7], "mean")):
        with pytest.raises(ValueError, match="combine="):
            pr.fit_predict_layers(states, layers, combine, *args)


@pytest.mark.parametrize("combine", [None, "concat", "ensemble"])
def test_pool_gold_and_features_never_reach_the_fit(monkeypatch, combine):
    """Fit on the labelled questions, predict the pool: changing every pool answer and half the pool's
    states leaves the other pool predictions bit-identical, and no fit ever sees a pool question."""
    seqs, states = _two_layer_data(120, 13)
    labelled = stratified_subset(seqs.answer, 0.5, seed=0)
    pool = np.setdiff1d(np.arange(120), labelled)
    layers = [7] if combine is None else [3, 7]
    fitted = []
    real_fit = pr.fit_probe

    def spy_fit(X_rows, s, questions, *args, **kw):
        fitted.append(np.asarray(questions).copy())
        return real_fit(X_rows, s, questions, *args, **kw)

    monkeypatch.setattr(pr, "fit_probe", spy_fit)
    before = pr.fit_predict_layers(states, layers, combine, seqs, labelled, pool, 1.0, 200, 0)
    changed = make_seqs("per_choice", seqs.n_choices, seqs.answer.copy())
    changed.answer[pool] = (seqs.answer[pool] + 1) % seqs.n_choices[pool]
    moved = pool[::2]
    rows = np.isin(seqs.row_question, moved)
    noisy = {k: np.where(rows[:, None], 10.0 * np.random.default_rng(k).standard_normal(x.shape), x).astype(np.float32)
             for k, x in states.items()}
    after = pr.fit_predict_layers(noisy, layers, combine, changed, labelled, pool, 1.0, 200, 0)
    kept = ~np.isin(pool, moved)
    np.testing.assert_array_equal(after[kept], before[kept])
    assert not np.allclose(after[~kept], before[~kept])  # the moved questions really are predicted from their states
    assert fitted and all(not set(f) & set(pool) and set(f) == set(labelled) for f in fitted)


# ---------------------------------------------------------------------------------------------
# Metrics and labels


def test_metrics_hand_cases():
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert accuracy(p, np.array([0, 0])) == 1.0 and accuracy(p, np.array([0, 1])) == 0.5
    # bins of width 0.1: |1 - 0.9| and |0 - 0.6|
    assert ece(p, np.array([0, 1]), n_bins=10) == pytest.approx((0.1 + 0.6) / 2)
    # one bin: |acc 0.5 - conf 0.75|
    assert ece(p, np.array([0, 1]), n_bins=1) == pytest.approx(0.25)
    assert ece(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)
    s = softmax_rows(np.array([[0.0, 0.0, -np.inf], [-np.inf] * 3, [1000.0, -np.inf, 1000.0], [0.0, np.log(3), -np.inf]]))
    np.testing.assert_allclose(s, [[0.5, 0.5, 0], [0, 0, 0], [0.5, 0, 0.5], [0.25, 0.75, 0]], atol=1e-12)


def test_labels_each_source():
    answer, n = np.array([0, 2, 1]), np.array([3, 5, 2])
    gold = lb.gold_targets(answer, n, 5)
    np.testing.assert_array_equal(gold, np.eye(5, dtype=np.float32)[answer])
    for soft in (True, False):
        np.testing.assert_array_equal(lb.make_targets("gold", answer=answer, n_choices=n, soft=soft), gold)

    logp = np.array([[0.0, np.log(3), -1.0, -np.inf, -np.inf],
                     [-1.0, -2.0, 0.0, -0.5, -3.0],
                     [-0.1, -2.0, -np.inf, -np.inf, -np.inf]])
    soft = lb.make_targets("logit", answer=answer, n_choices=n, teacher_logp=logp, soft=True)
    assert soft.dtype == np.float32 and soft.shape == (3, 5)
    check_prob_rows(soft, n)
    np.testing.assert_allclose(soft[0, :3], np.exp([0, np.log(3), -1]) / np.exp([0, np.log(3), -1]).sum(), rtol=1e-6)
    hard = lb.make_targets("logit", answer=answer, n_choices=n, teacher_logp=logp, soft=False)
    np.testing.assert_array_equal(hard.argmax(1), [1, 2, 0])
    np.testing.assert_array_equal(hard.sum(1), 1.0)
    assert lb.label_agreement(soft, answer) == pytest.approx(1 / 3)

    probs = np.array([[0.2, 0.2, 0.4, 0, 0], [0.1, 0.1, 0.5, 0.2, 0.1], [0.3, 0.6, 0.1, 0, 0]])
    pt = lb.make_targets("probe", answer=answer, n_choices=n, probe_probs=probs, soft=True)
    check_prob_rows(pt, n)
    np.testing.assert_allclose(pt[0, :3], [0.25, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_allclose(pt[2, :2], [1 / 3, 2 / 3], rtol=1e-6)  # choice 2 of a 2-choice question dropped
    np.testing.assert_array_equal(lb.hard(pt).argmax(1), [2, 2, 1])
    assert lb.label_agreement(lb.hard(pt), answer) == pytest.approx(2 / 3)
    # narrower probe matrices are padded
    assert lb.make_targets("probe", answer=answer, n_choices=n, probe_probs=probs[:, :3], soft=True).shape == (3, 5)
    with pytest.raises(ValueError):
        lb.make_targets("probe", answer=answer, n_choices=n, soft=True)
    with pytest.raises(ValueError):
        lb.make_targets("teacher", answer=answer, n_choices=n, soft=True)


# ---------------------------------------------------------------------------------------------
# Ray sweep over a tiny store


def build_store(path: str, mode: str, layers: list[int], signal_layer, sizes: dict[str, int], seed: int = 0,
                identity: dict | None = None, strength: float = 3.0):
    """A committed store of planted states (signal on `signal_layer`, an int or a tuple of layers)."""
    from engine.store import chunk_bounds, chunk_size, commit, create_or_resume, mark_done, n_chunks, write_chunk

    rng = np.random.default_rng(seed)
    dim = 16
    identity = identity or {"extract.chunk_rows": 64}
    chunk_rows = identity["extract.chunk_rows"]
    data = {}
    for split, q in sizes.items():
        seqs = make_seqs(mode, *random_questions(q, rng))
        states = np.stack([planted(seqs, dim, strength if layer in np.atleast_1d(signal_layer) else 0.0, rng)
                           for layer in layers], 1)
        data[split] = (seqs, states.astype(np.float16))
    splits = {s: (seqs, [f"{s}-{i}" for i in range(seqs.n_questions)], len(layers), dim) for s, (seqs, _) in data.items()}
    part = create_or_resume(path, identity, {"layers": layers}, splits)
    for split, (seqs, states) in data.items():
        size = chunk_size(seqs.n_rows, chunk_rows)
        for c in range(n_chunks(seqs.n_rows, size)):
            lo, hi = chunk_bounds(c, seqs.n_rows, size)
            write_chunk(part, split, c, states[lo:hi], np.zeros((hi - lo, seqs.score_width), np.float32))
            mark_done(part, split, c)
    commit(path)
    return {s: seqs for s, (seqs, _) in data.items()}


@pytest.fixture(scope="module")
def local_ray():
    """One local 2-CPU Ray for this module's sweeps."""
    import ray

    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": REPO}}, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_run_probe_sweep_on_ray(tmp_path, capsys, local_ray):
    from cluster.probes import run_probe_sweep

    store = str(tmp_path / "store")
    seqs = build_store(store, "per_choice", [2, 5], 5, {"train": 90, "validation": 40, "test": 40})
    train_q = stratified_subset(seqs["train"].answer, 0.8, seed=0)
    families = ("logreg", "conditional_logit", "mlp")
    out = run_probe_sweep(store, "per_choice", [2, 5], [0.1],
                          ProbeConfig(cs=(0.1,), folds=3, max_iter=200, families=families), seed=0, train_questions=train_q)
    assert "[probes] 2/2 layer " in capsys.readouterr().out  # one task per layer, 3 fits each
    assert out["best"]["layer"] == 5 and out["best"]["C"] == 0.1
    # every (family, layer) was fitted; per_layer keeps each layer's best on validation; best is the top of all
    assert sorted((r["family"], r["layer"]) for r in out["sweep"]) == sorted((f, la) for f in families for la in (2, 5))
    assert [r["layer"] for r in out["per_layer"]] == [2, 5]
    for r in out["per_layer"]:
        assert r["val_acc"] == max(x["val_acc"] for x in out["sweep"] if x["layer"] == r["layer"])
    assert out["best"]["val_acc"] == max(x["val_acc"] for x in out["sweep"]) and out["best"]["family"] in families
    by_layer = {r["layer"]: r for r in out["per_layer"]}
    assert by_layer[5]["val_acc"] > by_layer[2]["val_acc"] and by_layer[5]["val_acc"] > 0.7
    np.testing.assert_array_equal(out["train_questions"], train_q)
    tr = seqs["train"]
    assert out["oof_probs"].shape == out["oof_probs_raw"].shape == (len(train_q), tr.max_choices)
    check_prob_rows(out["oof_probs_raw"], tr.n_choices[train_q])  # every train question got a label
    check_prob_rows(out["oof_probs"], tr.n_choices[train_q])
    assert out["oof_acc"] == pytest.approx(accuracy(out["oof_probs_raw"], tr.answer[train_q]))
    assert out["oof_acc"] > 0.6 and out["temperature"] > 0
    assert out["test_probs"].shape == (40, seqs["test"].max_choices)
    assert 0 <= out["ece_calibrated"] <= 1 and 0 <= out["ece_raw"] <= 1
    assert not any(k.startswith("pool") for k in out)  # no pool unless probe.label_pool
    # The Ray fold tasks run the protocol the leak tests check: the same OOF labels as engine.probes.cross_fit.
    from engine.store import open_store, read_split

    best = out["best"]
    assert best["combine"] is None  # a single-layer best, so cross_fit can redo it from that layer's states
    view = read_split(open_store(store), "train", "per_choice")
    X = view.layer(best["layer"])
    again = pr.cross_fit(X, view.seqs, best["C"], 200, 3, 0, questions=train_q, family=best["family"])
    np.testing.assert_allclose(out["oof_probs_raw"], again, atol=1e-6)


def test_pipeline_probe_combines_layers_and_labels_the_pool(tmp_path, capsys, local_ray):
    """pipeline.probe with probe.combine and probe.label_pool: multi-layer candidates compete on validation,
    the pool's pseudo-labels are saved in the artifact, and a second call reuses it."""
    from types import SimpleNamespace

    from cluster import pipeline
    from engine.config import from_dict, store_identity

    cfg = from_dict({
        "out_dir": str(tmp_path / "run"), "data": {"train_fraction": 0.6}, "extract": {"layers": [2, 5, 7], "chunk_rows": 64},
        "probe": {"cs": [0.1], "folds": 3, "max_iter": 200, "combine": ["ensemble", "concat"], "combine_layers": 2,
                  "label_pool": True},
    })
    seqs = build_store(str(tmp_path / "run" / "activations.zarr"), "per_choice", [2, 5, 7], (5, 7),
                       {"train": 100, "validation": 50, "test": 40}, identity=store_identity(cfg), strength=1.5)
    run = pipeline.Run(cfg)
    run.__dict__["model_config"] = SimpleNamespace(num_hidden_layers=7)  # no teacher here: the store is synthetic
    tq = stratified_subset(seqs["train"].answer, 0.6, seed=0)
    run.__dict__["train_questions"] = tq
    probes = pipeline.probe(run)

    combined = [r for r in probes.sweep if r["combine"]]
    assert sorted(r["combine"] for r in combined) == ["concat", "ensemble"]
    single = [r for r in probes.sweep if not r["combine"]]
    members = pr.combine_members(single, 2, pr.best_result(single)["family"], 0.1)
    assert all(r["layer"] is None and r["layers"] == members for r in combined)
    assert [r["layer"] for r in probes.per_layer] == [2, 5, 7]
    assert probes.best["val_acc"] == max(r["val_acc"] for r in probes.sweep)
    assert pr.layers_of(probes.best) == tuple(pr.best_result(probes.sweep)["layers"])

    tr = seqs["train"]
    pool = probes.pool_questions
    np.testing.assert_array_equal(pool, np.setdiff1d(np.arange(tr.n_questions), tq))
    assert probes.n_pool == len(pool) == tr.n_questions - len(tq)
    for key in ("pool_probs", "pool_probs_raw"):
        assert getattr(probes, key).shape == (len(pool), tr.max_choices)
        check_prob_rows(getattr(probes, key), tr.n_choices[pool])
    np.testing.assert_allclose(probes.pool_probs, pr.apply_temperature(probes.pool_probs_raw, probes.temperature),
                               atol=1e-6)
    assert probes.pool_acc == pytest.approx(accuracy(probes.pool_probs_raw, tr.answer[pool]))  # the withheld gold
    assert probes.pool_ece == pytest.approx(ece(probes.pool_probs, tr.answer[pool]), abs=1e-6)
    assert probes.pool_acc > float(np.mean(1.0 / tr.n_choices[pool])) + 0.15
    assert probes.oof_probs.shape[0] == len(tq)  # the student's labels cover the labelled questions only

    again = pipeline.probe(run)
    assert "reusing" in capsys.readouterr().out and again.pool_acc == probes.pool_acc


def test_probe_identity_covers_combine_and_pool():
    """The probe artifact is keyed by the whole probe config and data.train_fraction (the labelled/pool split)."""
    from engine.config import config_hash, from_dict
    from engine.identity import identity

    base = from_dict({"data": {"train_fraction": 0.1}})
    variants = [{"probe": {"label_pool": True}}, {"probe": {"label_pool": True}, "data": {"train_fraction": 0.2}},
                {"probe": {"combine": ["concat"]}}, {"probe": {"combine": ["ensemble"]}}, {"probe": {"combine_layers": 4}}]
    hashes = {config_hash(identity(base, "probe"))}
    for v in variants:
        hashes.add(config_hash(identity(from_dict({"data": {"train_fraction": 0.1}, **v}), "probe")))
    assert len(hashes) == 1 + len(variants)


def test_sweep_pool_gold_and_features_never_reach_the_fit(tmp_path, local_ray):
    """Rewrite every pool answer and half the pool's states in the store: every fit, the selection, the
    OOF labels, the temperature and the other pool predictions are unchanged; pool_acc follows the new gold."""
    import zarr

    from cluster.probes import run_probe_sweep

    store = str(tmp_path / "store")
    seqs = build_store(store, "per_choice", [2, 5], 5, {"train": 80, "validation": 40, "test": 30})
    tq = stratified_subset(seqs["train"].answer, 0.5, seed=0)
    cfg = ProbeConfig(cs=(0.1,), folds=3, max_iter=200, label_pool=True)
    before = run_probe_sweep(store, "per_choice", [2, 5], [0.1], cfg, seed=0, train_questions=tq)
    pool = before["pool_questions"]
    assert len(pool) == 40 and not set(pool) & set(tq)

    g = zarr.open_group(store, mode="r+")["train"]
    answer = g["answer"][:]
    answer[pool] = (answer[pool] + 1) % g["n_choices"][:][pool]
    g["answer"][:] = answer
    moved = pool[::2]
    acts = g["activations"][:]
    rows = np.isin(g["row_question"][:], moved)
    acts[rows] = (10 * np.random.default_rng(9).standard_normal(acts[rows].shape)).astype(np.float16)
    g["activations"][:] = acts
    after = run_probe_sweep(store, "per_choice", [2, 5], [0.1], cfg, seed=0, train_questions=tq)

    assert after["best"] == before["best"] and after["sweep"] == [dict(r, fit_seconds=a["fit_seconds"])
                                                                  for r, a in zip(before["sweep"], after["sweep"])]
    for key in ("oof_probs", "test_probs", "temperature"):
        np.testing.assert_array_equal(after[key], before[key])
    kept = ~np.isin(pool, moved)
    np.testing.assert_array_equal(after["pool_probs"][kept], before["pool_probs"][kept])
    assert not np.allclose(after["pool_probs"][~kept], before["pool_probs"][~kept])
    assert after["pool_acc"] == pytest.approx(accuracy(after["pool_probs_raw"], answer[pool]))
    assert before["pool_acc"] == pytest.approx(accuracy(before["pool_probs_raw"], seqs["train"].answer[pool]))


# ---------------------------------------------------------------------------------------------
# Probe families: one entry each (engine/families.py)


@pytest.mark.parametrize("name", sorted(__import__("engine.families", fromlist=["FAMILIES"]).FAMILIES))
def test_every_registered_family_is_an_estimator_that_learns(name):
    """Whatever `FAMILIES` lists passes here: a fresh, clonable scikit-learn estimator per call that
    learns a planted signal in each prompt mode it accepts, with well-formed choice probabilities."""
    from sklearn.base import clone

    from engine.families import FAMILIES

    fam = FAMILIES[name]
    assert fam.name == name and fam.doc
    a, b = pr.make_probe(0.5, 50, 0, name), pr.make_probe(0.5, 50, 0, name)
    assert a is not b and clone(a).get_params().keys() == a.get_params().keys()
    rng = np.random.default_rng(11)
    for mode in ("per_choice",) if fam.grouped else ("per_choice", "letter"):
        n, ans = random_questions(120, rng, choices=(4,) if mode == "letter" else (3, 4, 5))
        seqs = make_seqs(mode, n, ans)
        X = planted(seqs, 8, 3.0, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe = pr.fit_probe(X, seqs, np.arange(90), 1.0, 300, 0, name)
        p = pr.choice_probs(probe, X, seqs, np.arange(90, 120))
        check_prob_rows(p, n[90:])
        assert accuracy(p, ans[90:]) > 0.6, (name, mode)


def test_a_new_family_is_one_entry(monkeypatch):
    """The README's worked example: one `ProbeFamily` in `FAMILIES` and the config accepts it, the sweep
    fits it, and a grouped family is refused in letter mode."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from engine import families
    from engine.config import ConfigError, from_dict

    def sparse_logreg(C, max_iter, seed):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, l1_ratio=1.0, solver="saga",
                                                                  max_iter=max_iter, random_state=seed))

    entry = families.ProbeFamily("sparse_logreg", sparse_logreg, "L1 logistic regression: few features")
    monkeypatch.setitem(families.FAMILIES, entry.name, entry)
    cfg = from_dict({"probe": {"families": ["logreg", "sparse_logreg"]}})
    assert cfg.probe.families == ("logreg", "sparse_logreg")
    rng = np.random.default_rng(12)
    n, ans = random_questions(120, rng)
    seqs = make_seqs("per_choice", n, ans)
    X = planted(seqs, 8, 3.0, rng)
    evals = {"validation": (X, seqs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = pr.fit_and_score(X, seqs, evals, 1.0, 300, 0, np.arange(90), "sparse_logreg")
    assert out["acc"]["validation"] > 0.6
    grouped = families.ProbeFamily("grouped_one", families.FAMILIES["conditional_logit"].build, "x", grouped=True)
    monkeypatch.setitem(families.FAMILIES, grouped.name, grouped)
    with pytest.raises(ConfigError, match=r"probe\.families: \['grouped_one'\] score choices within a question"):
        from_dict({"prompt": {"mode": "letter"}, "probe": {"families": ["grouped_one"]}})
    with pytest.raises(ConfigError, match=r"probe\.families: use some of logreg, conditional_logit, mlp, sparse_logreg"):
        from_dict({"probe": {"families": ["nope"]}})


def test_calibrated_labels_keep_the_answers_and_lower_ece():
    """Temperature scaling fitted on the OOF predictions: an overconfident probe gets T > 1, lower ECE on
    those predictions, and every question keeps its predicted answer (the labels' argmax)."""
    from engine.probes import calibrated_labels

    rng = np.random.default_rng(0)
    answer = rng.integers(0, 4, 400)
    right = rng.random(400) < 0.6
    pred = np.where(right, answer, (answer + 1) % 4)
    oof = np.full((400, 4), 0.01, dtype=np.float32)
    oof[np.arange(400), pred] = 0.97  # 97% sure, 60% right
    out = calibrated_labels(oof, answer, oof[:100], answer[:100])
    assert out["temperature"] > 1.0 and out["ece_calibrated"] < out["ece_raw"] / 2
    assert (out["oof_probs"].argmax(1) == pred).all() and np.allclose(out["oof_probs"].sum(1), 1.0, atol=1e-5)
    assert out["oof_acc"] == pytest.approx(right.mean())
    assert out["test_ece_calibrated"] < out["test_ece_raw"]


def test_probe_stage_is_its_artifact_typed(tmp_path, local_ray):
    """pipeline.probe hands on a ProbeStage made from the committed artifact's (meta, arrays): every typed
    field is the meta's value or the array as saved, and its report section is, byte for byte, the keys
    the report took from meta.json before (and passes the report's check)."""
    import json
    from types import SimpleNamespace

    from cluster import pipeline
    from engine import artifacts
    from engine.config import from_dict, store_identity
    from engine.identity import identity
    from engine.results import PROBE_REPORT_KEYS, ProbesSection, ProbeStage, check

    cfg = from_dict({"out_dir": str(tmp_path / "run"), "data": {"train_fraction": 0.6},
                     "extract": {"layers": [2, 5], "chunk_rows": 64},
                     "probe": {"cs": [0.1], "folds": 3, "max_iter": 200, "label_pool": True}})
    seqs = build_store(str(tmp_path / "run" / "activations.zarr"), "per_choice", [2, 5], 5,
                       {"train": 60, "validation": 30, "test": 30}, identity=store_identity(cfg))
    run = pipeline.Run(cfg)
    run.__dict__["model_config"] = SimpleNamespace(num_hidden_layers=5)
    run.__dict__["train_questions"] = stratified_subset(seqs["train"].answer, 0.6, seed=0)
    stage = pipeline.probe(run)
    meta, arrays = artifacts.load(pipeline.probe_dir(cfg), identity(cfg, "probe"))
    assert isinstance(stage, ProbeStage) and stage.artifact == str(pipeline.probe_dir(cfg))
    built = ProbeStage.from_artifact(meta, arrays, artifact=pipeline.probe_dir(cfg))
    assert built.to_report() == stage.to_report() and list(built.meta) == list(stage.meta)
    for f in ("per_layer", "sweep", "best", "oof_acc", "temperature", "ece_raw", "ece_calibrated", "test_ece_raw",
              "test_ece_calibrated", "n_pool", "pool_acc", "pool_ece", "pool_ece_raw", "stage_seconds", "config_hash",
              "seconds"):
        assert getattr(stage, f) == meta[f], f
    assert set(arrays) == {"oof_probs", "oof_probs_raw", "test_probs", "test_probs_calibrated", "train_questions",
                           "pool_questions", "pool_probs", "pool_probs_raw"}
    for name, arr in arrays.items():
        np.testing.assert_array_equal(getattr(stage, name), arr)
    assert list(stage.meta) == list(meta) and {"config", "identity", "identity_hash", "files"} <= set(stage.meta)

    before = {k: meta[k] for k in PROBE_REPORT_KEYS if k in meta}  # what pipeline.report put in report.json
    assert json.dumps(stage.to_report(), indent=2) == json.dumps(before, indent=2)
    check(ProbesSection, stage.to_report(), "probes")
    again = pipeline.probe(run)  # reused: the same
    assert json.dumps(again.to_report()) == json.dumps(before)
