"""scikit-learn estimators for probe families beyond StandardScaler + LogisticRegression, and multi-layer helpers.

* `ConditionalLogitProbe`: one linear scorer s(x) = w.x (+ b) shared by all choices, fitted with the
  conditional-logit likelihood within each question (`groups`), so a question-level offset shared by
  all its choices cannot affect the fit. Without groups it is exactly L2 binary logistic regression.
* `MLPProbe`: StandardScaler + a one-hidden-layer `MLPClassifier`; multiclass for letter mode, binary on
  rows for per-choice mode with `decision_function` = log-odds, to be softmaxed within a question.
* `concat_layers`, `ensemble_log_probs`: pure helpers to probe several layers jointly or to combine
  per-layer probes.

Both estimators follow the scikit-learn contract (`check_estimator` passes) and plug into
`engine.probes.choice_probs` unchanged: per-choice mode reads `decision_function`, letter mode reads
`predict_proba` and `classes_`. C has LogisticRegression's meaning everywhere: the objective is the
SUM of per-sample (per-question) losses plus ||w||^2 / (2C).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from engine.metrics import softmax_rows


def _check_two_classes(y: np.ndarray, name: str) -> np.ndarray:
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"{name} needs at least 2 classes in y; got {len(classes)} class ({classes.tolist()})")
    return classes


def _check_positive(name: str, value, minimum: float = 0.0, strict: bool = True) -> None:
    ok = value > minimum if strict else value >= minimum
    if not ok:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _group_index(groups, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(unique group ids, per-row index into them) for a 1-D `groups` of length n_rows."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n_rows:
        raise ValueError(f"groups must be 1-D with one entry per row ({n_rows}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)


def _group_lse_softmax(s: np.ndarray, inv: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group log-sum-exp (n_groups,) and per-row softmax within its group (rows,)."""
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, inv, s)
    e = np.exp(s - top[inv])
    z = np.bincount(inv, weights=e, minlength=n_groups)
    return top + np.log(z), e / z[inv]


def _loss_grad(params: np.ndarray, Z: np.ndarray, y: np.ndarray, inv: np.ndarray | None, n_groups: int,
               C: float, fit_intercept: bool) -> tuple[float, np.ndarray]:
    """Penalised conditional-logit NLL and its gradient; params = w, or [w, b] when fit_intercept.

    inv None: every row is its own group against an outside option of score 0 (binary logistic loss,
    sum_i log(1 + e^s_i) - y_i s_i). Otherwise: sum_g logsumexp(s over g's rows) - s(g's positive row).
    The penalty ||w||^2 / (2C) never touches b.
    """
    d = Z.shape[1]
    w = params[:d]
    s = Z @ w + (params[d] if fit_intercept else 0.0)
    if inv is None:
        loss = np.sum(np.logaddexp(0.0, s) - y * s)
        r = expit(s) - y
    else:
        lse, p = _group_lse_softmax(s, inv, n_groups)
        loss = np.sum(lse) - np.sum(s[y == 1])
        r = p - y
    loss += w @ w / (2.0 * C)
    grad_w = Z.T @ r + w / C
    grad = np.append(grad_w, r.sum()) if fit_intercept else grad_w
    return float(loss), grad


class ConditionalLogitProbe(ClassifierMixin, BaseEstimator):
    """Linear scorer shared by all choices, fitted by conditional logit within groups (questions).

    Parameters
    ----------
    C : inverse L2 strength, as in LogisticRegression: objective = sum of per-group NLLs + ||w||^2 / (2C).
    max_iter : L-BFGS-B iteration limit.
    tol : L-BFGS-B gradient tolerance on the objective divided by the number of groups.
    fit_intercept : fit b in the binary case (groups=None); within groups an intercept cancels and is never fitted.
    standardize : divide features by their std (and centre them when b is fitted) before the fit; the
        penalty then acts on standardised weights, as in StandardScaler + LogisticRegression.

    Learned: `classes_` (label `classes_[1]` is "this row is the correct choice"), `coef_` (1, d) and
    `intercept_` (1,) on the raw features (mean_ and scale_ folded in), `mean_`, `scale_`, `n_iter_`,
    `n_features_in_`. With groups the scores' level is arbitrary (intercept_ = 0): use `group_proba`,
    not `predict_proba`.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-6, fit_intercept: bool = True,
                 standardize: bool = True):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.standardize = standardize

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y, groups=None):
        """Fit on rows X (n, d) with binary y; `groups` (n,) is the question id of each row, or None."""
        _check_positive("C", self.C)
        _check_positive("max_iter", self.max_iter, 1, strict=False)
        _check_positive("tol", self.tol, strict=False)
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        y_type = type_of_target(y, input_name="y", raise_unknown=True)
        if y_type != "binary":
            raise ValueError(f"Only binary classification is supported. The type of the target is {y_type}.")
        self.classes_ = _check_two_classes(y, type(self).__name__)
        y01 = (y == self.classes_[1]).astype(np.float64)

        inv, n_groups = None, len(y01)
        if groups is not None:
            ids, inv = _group_index(groups, len(y01))
            n_groups = len(ids)
            pos = np.bincount(inv, weights=y01, minlength=n_groups)
            for bad, what in ((pos == 0, "no positive row"), (pos > 1, "more than one positive row")):
                if bad.any():
                    raise ValueError(f"{bad.sum()} group(s) with {what} (positive label {self.classes_[1]!r}), "
                                     f"e.g. {ids[bad][:3].tolist()}; each group needs exactly one correct row")
        fit_b = self.fit_intercept and groups is None

        self.mean_ = X.mean(axis=0) if fit_b and self.standardize else np.zeros(X.shape[1])
        scale = X.std(axis=0) if self.standardize else np.ones(X.shape[1])
        # A constant column has a std of rounding noise, not 0: leave such columns unscaled.
        self.scale_ = np.where(scale > 1e-12 * max(1.0, float(np.abs(X).max(initial=0.0))), scale, 1.0)
        Z = (X - self.mean_) / self.scale_

        def objective(params):
            loss, grad = _loss_grad(params, Z, y01, inv, n_groups, self.C, fit_b)
            return loss / n_groups, grad / n_groups

        x0 = np.zeros(X.shape[1] + int(fit_b))
        res = minimize(objective, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50})
        if not res.success:
            warnings.warn(f"ConditionalLogitProbe: L-BFGS-B did not converge ({res.message}); "
                          "increase max_iter or scale the data", ConvergenceWarning, stacklevel=2)
        w = res.x[: X.shape[1]] / self.scale_
        b = res.x[-1] if fit_b else 0.0
        self.coef_ = w[None, :]
        self.intercept_ = np.array([b - w @ self.mean_])
        self.n_iter_ = int(res.nit)
        return self

    def decision_function(self, X) -> np.ndarray:
        """(n,) row scores w.x + b (log-odds of classes_[1] in the binary case)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X) -> np.ndarray:
        """(n, 2) binary probabilities, sigmoid of the score (meaningful for fits without groups)."""
        p = expit(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        """classes_[1] where the score is positive, else classes_[0]."""
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(np.int64)]

    def group_proba(self, X, groups) -> np.ndarray:
        """(n,) probability of each row being its group's correct choice: softmax of scores within each group."""
        s = self.decision_function(X)
        ids, inv = _group_index(groups, len(s))
        return _group_lse_softmax(s, inv, len(ids))[1]


class MLPProbe(ClassifierMixin, BaseEstimator):
    """StandardScaler + MLPClassifier with one ReLU hidden layer, full-batch L-BFGS, seeded.

    `C` maps to MLPClassifier's `alpha = 1 / C`: MLPClassifier minimises mean(loss) + alpha ||W||^2 / (2n),
    i.e. (sum(loss) + alpha ||W||^2 / 2) / n, so alpha = 1/C gives LogisticRegression's convention
    sum(loss) + ||W||^2 / (2C) on the weights (biases unpenalised). L-BFGS is full-batch, so there is
    no early stopping, shuffling or learning rate: the fit is a deterministic function of the data and `seed`.

    Letter mode: multiclass over answer indices (`predict_proba`, `classes_`). Per-choice mode: binary
    on rows; `decision_function` is the output layer's log-odds, to be softmaxed within a question.
    """

    def __init__(self, hidden: int = 128, C: float = 1.0, max_iter: int = 200, seed: int = 0):
        self.hidden = hidden
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X, y):
        """Fit the scaler and the MLP on X (n, d) and labels y."""
        _check_positive("C", self.C)
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        _check_two_classes(y, type(self).__name__)
        self.scaler_ = StandardScaler().fit(X)
        self.mlp_ = MLPClassifier(hidden_layer_sizes=(self.hidden,), activation="relu", solver="lbfgs", alpha=1.0 / self.C,
                                  max_iter=self.max_iter, early_stopping=False, random_state=self.seed)
        self.mlp_.fit(self.scaler_.transform(X), y)
        self.classes_ = self.mlp_.classes_
        self.n_iter_ = self.mlp_.n_iter_
        return self

    def decision_function(self, X) -> np.ndarray:
        """Output-layer logits: (n,) log-odds of classes_[1] for two classes, else (n, n_classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        (w0, w1), (b0, b1) = self.mlp_.coefs_, self.mlp_.intercepts_
        out = np.maximum(self.scaler_.transform(X) @ w0 + b0, 0.0) @ w1 + b1
        return out[:, 0] if len(self.classes_) == 2 else out

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes) probabilities: sigmoid (binary) or softmax (multiclass) of the logits."""
        z = self.decision_function(X)
        if z.ndim == 1:
            p = expit(z)
            return np.column_stack([1.0 - p, p])
        return softmax_rows(z)

    def predict(self, X) -> np.ndarray:
        """The most probable class."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


# ---------------------------------------------------------------------------------------------
# Multi-layer helpers


def concat_layers(states: dict[int, np.ndarray], layers: list[int]) -> np.ndarray:
    """Column-wise concatenation (rows, sum of hidden sizes) of `states[layer]` for `layers`, in that order."""
    layers = list(layers)
    if not layers:
        raise ValueError("concat_layers: no layers given")
    missing = [layer for layer in layers if layer not in states]
    if missing:
        raise KeyError(f"concat_layers: layers {missing} not in states (have {sorted(states)})")
    arrays = [np.asarray(states[layer]) for layer in layers]
    shapes = {layer: a.shape for layer, a in zip(layers, arrays)}
    if any(a.ndim != 2 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
        raise ValueError(f"concat_layers: need 2-D arrays with equal row counts, got shapes {shapes}")
    return np.concatenate(arrays, axis=1)


def ensemble_log_probs(prob_arrays, weights=None) -> np.ndarray:
    """Weighted mean of log-probabilities of (Q, C_max) probability arrays, renormalised per row.

    The result is the normalised weighted geometric mean: softmax over the row of sum_k w_k log p_k with
    weights normalised to sum to 1 (equal when None). A choice that is absent (0, or -inf/nan) in any
    member with positive weight gets 0; a row with no choice present in all such members comes out all 0.
    """
    arrays = [np.asarray(p, dtype=np.float64) for p in prob_arrays]
    if not arrays:
        raise ValueError("ensemble_log_probs: no probability arrays given")
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"ensemble_log_probs: need 2-D arrays of one shape, got {[a.shape for a in arrays]}")
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble_log_probs: need {len(arrays)} non-negative weights with a positive sum, got {weights}")
    w = w / w.sum()
    total = np.zeros(arrays[0].shape)
    for wk, p in zip(w, arrays):
        if wk == 0:
            continue
        present = np.isfinite(p) & (p > 0)
        total += np.where(present, wk * np.log(np.where(present, p, 1.0)), -np.inf)
    return softmax_rows(total)
