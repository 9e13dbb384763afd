"""Probe estimators in engine.probe_models: sklearn's estimator checks, the conditional-logit fit on
offset-heavy grouped data, its gradient and C convention, the MLP on a nonlinear signal, and the
multi-layer helpers. All synthetic; the module takes ~10 s on 2 cores, most of it sklearn's checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import check_grad
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import estimator_checks_generator

from engine import probes as pr
from engine.metrics import accuracy
from engine.probe_models import ConditionalLogitProbe, MLPProbe, _loss_grad, concat_layers, ensemble_log_probs
from engine.sequences import Sequences

REPO = Path(__file__).resolve().parents[1]

# MLPProbe's L-BFGS often stops at max_iter=200 on these small, nearly separable sets; that cap is intended.
pytestmark = pytest.mark.filterwarnings("ignore:lbfgs failed to converge:sklearn.exceptions.ConvergenceWarning")

# ---------------------------------------------------------------------------------------------
# sklearn's estimator contract

# Nothing is expected to fail; the dict lists any check that genuinely cannot apply, with its reason.
EXPECTED_FAILED: dict[str, dict[str, str]] = {"ConditionalLogitProbe": {}, "MLPProbe": {}}
# sklearn skips check_array_api_input unless SCIPY_ARRAY_API=1 was set before scipy loaded; the next
# test runs it in such a process instead, so it is left out here rather than reported as skipped.
IN_OWN_PROCESS = {"check_array_api_input"}


def _checks():
    for est in (ConditionalLogitProbe(), MLPProbe(hidden=16)):
        for e, check in estimator_checks_generator(est, expected_failed_checks=EXPECTED_FAILED[type(est).__name__]):
            name = getattr(check, "func", check).__name__
            if name not in IN_OWN_PROCESS:
                yield pytest.param(e, check, id=f"{type(e).__name__}-{name}")


@pytest.mark.parametrize("estimator, check", list(_checks()))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_array_api_check_in_a_scipy_array_api_process():
    """sklearn skips check_array_api_input above unless SCIPY_ARRAY_API=1 was set before scipy was imported;
    run exactly that check (as sklearn yields it for estimators without array API support) in a fresh process."""
    code = (
        "from sklearn.utils.estimator_checks import check_array_api_input\n"
        "from engine.probe_models import ConditionalLogitProbe, MLPProbe\n"
        "for est in (ConditionalLogitProbe(), MLPProbe(hidden=16)):\n"
        "    check_array_api_input(type(est).__name__, est, array_namespace='numpy', expect_only_array_outputs=False)\n"
    )
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Conditional logit on grouped data

K = 4


def grouped_data(seed: int, q: int = 300, d: int = 20, signal: float = 3.0, offset: float = 5.0):
    """q questions x K choices. The correct row is shifted by `signal` along e0; every question adds one
    offset shared by its choices: N(0, 1) per dim plus a large N(0, offset^2) along e0 + e1.

    The shared offset carries no within-question information, but it dominates the ROW-level variance
    along e0, so a row classifier prefers e0 - e1 (which cancels it) over e0 (which ranks choices best).
    """
    rng = np.random.default_rng(seed)
    answer = rng.integers(0, K, q)
    groups = np.repeat(np.arange(q), K)
    y = (np.tile(np.arange(K), q) == answer[groups]).astype(np.int64)
    X = rng.normal(size=(q * K, d))
    X[:, 0] += signal * y
    shared = rng.normal(size=(q, d))
    shared[:, :2] += offset * rng.normal(size=(q, 1))
    return X + shared[groups], y, groups, answer


def grouped_accuracy(scores: np.ndarray, answer: np.ndarray) -> float:
    return float(np.mean(scores.reshape(-1, K).argmax(axis=1) == answer))


def test_conditional_logit_beats_row_logistic_on_offset_heavy_data():
    X, y, g, _ = grouped_data(0)
    Xt, _, gt, at = grouped_data(1)
    cl = ConditionalLogitProbe().fit(X, y, groups=g)
    lr = LogisticRegression().fit(X, y)
    acc_cl = grouped_accuracy(cl.decision_function(Xt), at)
    acc_lr = grouped_accuracy(lr.decision_function(Xt), at)  # softmax within a question keeps the argmax
    # Measured: conditional logit 0.940, row logistic regression 0.853 (other seeds: 0.92-0.97 vs 0.83-0.88).
    assert acc_cl >= 0.90, acc_cl
    assert acc_cl - acc_lr >= 0.05, (acc_cl, acc_lr)
    # Why: the conditional logit ignores e1 (pure noise within a question); the row classifier leans on -e1.
    w_cl, w_lr = cl.coef_[0] * cl.scale_, lr.coef_[0]
    assert abs(w_cl[1]) < 0.15 * w_cl[0], w_cl[:2]
    assert w_lr[1] < -0.5 * w_lr[0], w_lr[:2]


def test_group_proba_normalised_and_offset_invariant():
    X, y, g, _ = grouped_data(0, q=60)
    cl = ConditionalLogitProbe().fit(X, y, groups=g)
    p = cl.group_proba(X, g)
    np.testing.assert_allclose(np.bincount(g, weights=p), 1.0, atol=1e-12)
    shifted = X.copy()
    shifted[g == 7] += np.random.default_rng(3).normal(scale=50.0, size=X.shape[1])
    np.testing.assert_allclose(cl.group_proba(shifted, g), p, atol=1e-9)
    # String group ids in any order work the same.
    names = np.array([f"q{i}" for i in g])[::-1]
    np.testing.assert_allclose(cl.group_proba(X[::-1], names), p[::-1], atol=1e-12)


def test_grouped_fit_ignores_per_group_offsets():
    X, y, g, _ = grouped_data(2, q=80)
    offsets = np.random.default_rng(5).normal(scale=10.0, size=(80, X.shape[1]))
    a = ConditionalLogitProbe(standardize=False, tol=1e-10).fit(X, y, groups=g)
    b = ConditionalLogitProbe(standardize=False, tol=1e-10).fit(X + offsets[g], y, groups=g)
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-6)
    assert a.intercept_[0] == 0.0 and b.intercept_[0] == 0.0


def test_groups_need_exactly_one_positive():
    X = np.random.default_rng(0).normal(size=(6, 3))
    g = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"1 group\(s\) with no positive row .*\[1\]"):
        ConditionalLogitProbe().fit(X, [0, 1, 0, 0, 0, 0], groups=g)
    with pytest.raises(ValueError, match=r"1 group\(s\) with more than one positive row .*\[0\]"):
        ConditionalLogitProbe().fit(X, [1, 1, 0, 0, 1, 0], groups=g)
    with pytest.raises(ValueError, match="one entry per row"):
        ConditionalLogitProbe().fit(X, [1, 0, 0, 0, 1, 0], groups=g[:5])


@pytest.mark.parametrize("grouped", [True, False])
def test_loss_gradient_matches_finite_differences(grouped):
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(12, 3))
    if grouped:
        inv, y, n_groups, fit_b = np.repeat(np.arange(3), 4), np.tile([0, 0, 1, 0], 3).astype(float), 3, False
    else:
        inv, y, n_groups, fit_b = None, rng.integers(0, 2, 12).astype(float), 12, True
    x0 = rng.normal(size=3 + int(fit_b))
    err = check_grad(lambda p: _loss_grad(p, Z, y, inv, n_groups, 0.7, fit_b)[0],
                     lambda p: _loss_grad(p, Z, y, inv, n_groups, 0.7, fit_b)[1], x0)
    assert err < 1e-6 * max(1.0, np.linalg.norm(_loss_grad(x0, Z, y, inv, n_groups, 0.7, fit_b)[1])), err


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_without_groups_matches_logistic_regression(C):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5)) * [1.0, 2.0, 0.5, 1.0, 3.0] + 0.7
    y = (X @ [1.0, -0.5, 2.0, 0.0, 0.3] + rng.normal(size=200) > 1.0).astype(int)
    ours = ConditionalLogitProbe(C=C, standardize=False, tol=1e-10, max_iter=10_000).fit(X, y)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-5)


def test_plugs_into_choice_probs():
    X, y, g, answer = grouped_data(0, q=50)
    q = len(answer)
    seqs = Sequences(mode="per_choice", ids=[np.zeros(1, np.int64)] * len(g), start=np.zeros(len(g), np.int64),
                     row_question=g, row_choice=np.tile(np.arange(K), q), n_choices=np.full(q, K), answer=answer,
                     letter_ids=np.zeros(0, np.int64))
    cl = ConditionalLogitProbe().fit(X, y, groups=g)
    probs = pr.choice_probs(cl, X, seqs)
    np.testing.assert_allclose(probs, cl.group_proba(X, g).reshape(q, K), atol=1e-12)
    assert accuracy(probs, answer) > 0.85


# ---------------------------------------------------------------------------------------------
# MLP probe


def xor_data(seed: int, n: int = 600, d: int = 6):
    """Gaussian rows; the label is the sign of x0 * x1, which no linear function of x predicts."""
    X = np.random.default_rng(seed).normal(size=(n, d))
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def test_mlp_learns_xor_that_a_linear_probe_cannot():
    X, y = xor_data(0)
    Xt, yt = xor_data(1)
    mlp = MLPProbe(hidden=32, C=1.0, seed=0).fit(X, y)
    acc_mlp = float(np.mean(mlp.predict(Xt) == yt))
    acc_lin = float(np.mean(LogisticRegression().fit(X, y).predict(Xt) == yt))
    # Measured: MLP 0.97, linear 0.47.
    assert acc_mlp >= 0.88 and acc_lin <= 0.62, (acc_mlp, acc_lin)


def test_mlp_deterministic_given_seed():
    X, y = xor_data(0, n=200)
    a = MLPProbe(hidden=16, seed=3).fit(X, y).decision_function(X)
    np.testing.assert_array_equal(a, MLPProbe(hidden=16, seed=3).fit(X, y).decision_function(X))
    assert not np.allclose(a, MLPProbe(hidden=16, seed=4).fit(X, y).decision_function(X))


def test_mlp_binary_log_odds_and_multiclass_logits():
    X, y = xor_data(0, n=200)
    mlp = MLPProbe(hidden=16).fit(X, y)
    z, p = mlp.decision_function(X), mlp.predict_proba(X)
    assert z.shape == (200,)
    np.testing.assert_allclose(z, np.log(p[:, 1]) - np.log(p[:, 0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p, mlp.mlp_.predict_proba(mlp.scaler_.transform(X)), atol=1e-12)  # same forward pass

    y3 = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    mlp3 = MLPProbe(hidden=16).fit(X, y3)
    z3, p3 = mlp3.decision_function(X), mlp3.predict_proba(X)
    assert z3.shape == p3.shape == (200, 3)
    np.testing.assert_allclose(p3, mlp3.mlp_.predict_proba(mlp3.scaler_.transform(X)), atol=1e-12)
    np.testing.assert_allclose(p3.sum(axis=1), 1.0)


def test_mlp_alpha_is_one_over_C():
    X, y = xor_data(0, n=50)
    assert MLPProbe(hidden=4, C=0.25).fit(X, y).mlp_.alpha == 4.0


# ---------------------------------------------------------------------------------------------
# Multi-layer helpers


def test_concat_layers():
    states = {1: np.ones((3, 2)), 4: np.arange(9.0).reshape(3, 3), 7: np.zeros((2, 2))}
    out = concat_layers(states, [4, 1])
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(out[:, :3], states[4])
    np.testing.assert_array_equal(out[:, 3:], 1.0)
    with pytest.raises(KeyError, match=r"\[2\] not in states"):
        concat_layers(states, [1, 2])
    with pytest.raises(ValueError, match="equal row counts"):
        concat_layers(states, [1, 7])
    with pytest.raises(ValueError, match="no layers"):
        concat_layers(states, [])


def test_ensemble_log_probs():
    a = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    b = np.array([[0.4, 0.4, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    out = ensemble_log_probs([a, b])
    geo = np.sqrt(a * b)
    np.testing.assert_allclose(out, geo / geo.sum(axis=1, keepdims=True))
    assert out[0, 3] == 0.0
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    # Weights: all on one member returns it; unnormalised weights are normalised.
    np.testing.assert_allclose(ensemble_log_probs([a, b], weights=[1.0, 0.0]), a)
    w = a ** 0.75 * b ** 0.25
    np.testing.assert_allclose(ensemble_log_probs([a, b], weights=[3, 1]), w / w.sum(axis=1, keepdims=True))
    # -inf marks an absent choice like 0 does; a choice absent in one member is absent in the result.
    c = np.where(a > 0, a, -np.inf)
    np.testing.assert_allclose(ensemble_log_probs([c, b]), out)
    d = b.copy()
    d[1] = [0.0, 0.5, 0.5, 0.0]
    mixed = ensemble_log_probs([a, d])
    assert mixed[1, 0] == 0.0 and mixed[1, 3] == 0.0
    np.testing.assert_allclose(mixed[1], [0.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="one shape"):
        ensemble_log_probs([a, b[:, :3]])
    with pytest.raises(ValueError, match="non-negative weights"):
        ensemble_log_probs([a, b], weights=[1.0])
