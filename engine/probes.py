"""Linear probes on frozen teacher states: fitting, scoring, cross-fitting, selection and calibration.

Two readouts, following `Sequences.mode` (each its mode's `probe_targets` and `probe_probs`, `engine.modes`):

* letter: one row per question; StandardScaler + multinomial logistic regression over the answer
  index. A fold may lack some classes: `classes_` are mapped to their choice columns, absent choices
  get 0 and each row is renormalised over the question's present choices.
* per_choice: one row per (question, choice); StandardScaler + binary logistic regression on "this
  row is the correct choice". A question's probabilities are the softmax over its rows'
  `decision_function` values (a conditional-logit style readout).

Cross-fitting splits QUESTIONS into folds (stratified by answer, seeded), so every row of a question
is on the same side and a probe never labels a question it was fitted on. The (layer, C) is chosen on
validation accuracy only; test accuracy is reported, never used.

Multi-layer candidates use several layers at once: 'concat' fits one probe on the layers' states side
by side; 'ensemble' fits one probe per layer and takes the normalised geometric mean of their choice
probabilities. A result of such a candidate has `layer` None, `layers` its member layers and
`combine` its kind; `fit_predict_layers` fits and predicts any candidate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from engine.families import family as probe_family
from engine.metrics import accuracy, ece, softmax_rows
from engine.modes import prompt_mode
from engine.probe_models import concat_layers, ensemble_log_probs
from engine.sequences import Sequences


def make_probe(C: float, max_iter: int, seed: int, family: str = "logreg"):
    """A fresh, unfitted estimator of the probe family `family` (`engine.families.FAMILIES`)."""
    return probe_family(family).build(C, max_iter, seed)


def question_folds(answer: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(Q,) fold id in [0, folds) per question, stratified by answer and seeded.

    Each answer class is shuffled by `seed` and dealt round-robin, continuing where the previous
    class stopped, so fold sizes differ by at most one overall and per class.
    """
    answer = np.asarray(answer)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(answer) < folds:
        raise ValueError(f"{len(answer)} questions cannot fill {folds} folds; lower probe.folds")
    rng = np.random.default_rng(seed)
    out = np.empty(len(answer), dtype=np.int64)
    offset = 0
    for cls in np.unique(answer):
        members = rng.permutation(np.flatnonzero(answer == cls))
        out[members] = (offset + np.arange(len(members))) % folds
        offset = (offset + len(members)) % folds
    return out


def _rows_of(seqs: Sequences, questions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `questions` and, for each, the position of its question within `questions`."""
    questions = np.asarray(questions, dtype=np.int64)
    pos = np.full(seqs.n_questions, -1, dtype=np.int64)
    pos[questions] = np.arange(len(questions))
    rows = np.flatnonzero(pos[seqs.row_question] >= 0)
    return rows, pos[seqs.row_question[rows]]


def _all(seqs: Sequences, questions: np.ndarray | None) -> np.ndarray:
    return np.arange(seqs.n_questions) if questions is None else np.asarray(questions, dtype=np.int64)


def probe_targets_for_rows(seqs: Sequences, rows: np.ndarray) -> np.ndarray:
    """Letter: the answer index of each row's question. Per-choice: 1 where the row is the gold choice."""
    return prompt_mode(seqs.mode).probe_targets(seqs, rows)


def fit_probe(
    X_rows: np.ndarray, seqs: Sequences, questions: np.ndarray | None, C: float, max_iter: int, seed: int,
    family: str = "logreg",
):
    """Fit a probe on the rows of `questions` (all questions when None); X_rows is (R, hidden) over all rows.
    A conditional-logit probe is fitted within questions (its `groups`)."""
    rows, _ = _rows_of(seqs, _all(seqs, questions))
    y = probe_targets_for_rows(seqs, rows)
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"probe: the {len(rows)} training rows hold a single class ({np.unique(y)}); "
            "use more train questions or fewer folds"
        )
    probe = make_probe(C, max_iter, seed, family)
    if probe_family(family).grouped:
        if not prompt_mode(seqs.mode).row_per_choice:
            raise ValueError(f"probe family {family!r} needs per-choice rows; use prompt.mode=per_choice")
        probe.fit(np.asarray(X_rows)[rows], y, groups=seqs.row_question[rows])
    else:
        probe.fit(np.asarray(X_rows)[rows], y)
    return probe


def choice_probs(
    probe: Pipeline, X_rows: np.ndarray, seqs: Sequences, questions: np.ndarray | None = None
) -> np.ndarray:
    """(Q_sel, C_max) choice probabilities of `questions` (all when None), zeros beyond n_choices."""
    questions = _all(seqs, questions)
    rows, pos = _rows_of(seqs, questions)
    width = seqs.max_choices
    present = np.arange(width)[None, :] < seqs.n_choices[questions][:, None]
    X = np.asarray(X_rows)[rows]
    return prompt_mode(seqs.mode).probe_probs(probe, X, seqs, rows, pos, present)


def fit_predict(
    X_rows: np.ndarray, seqs: Sequences, fit_questions: np.ndarray, predict_questions: np.ndarray,
    C: float, max_iter: int, seed: int, family: str = "logreg",
) -> np.ndarray:
    """Fit on `fit_questions`, return choice probabilities of `predict_questions` (must not overlap)."""
    overlap = np.intersect1d(fit_questions, predict_questions)
    if len(overlap):
        raise ValueError(f"fit and predict questions overlap ({len(overlap)} shared, e.g. {overlap[0]})")
    probe = fit_probe(X_rows, seqs, fit_questions, C, max_iter, seed, family)
    return choice_probs(probe, X_rows, seqs, predict_questions)


def fit_and_score(
    train_X: np.ndarray,
    train_seqs: Sequences,
    evals: dict[str, tuple[np.ndarray, Sequences]],
    C: float,
    max_iter: int,
    seed: int,
    train_questions: np.ndarray | None = None,
    family: str = "logreg",
) -> dict[str, Any]:
    """Fit on train (restricted to `train_questions`), score every eval split.

    Returns {"C", "fit_seconds", "n_train", "acc": {split: float}, "probs": {split: (Q, C_max)}}.
    """
    t0 = time.perf_counter()
    probe = fit_probe(train_X, train_seqs, train_questions, C, max_iter, seed, family)
    fit_s = time.perf_counter() - t0
    acc, probs = {}, {}
    for name, (X, seqs) in evals.items():
        p = choice_probs(probe, X, seqs).astype(np.float32)
        probs[name] = p
        acc[name] = accuracy(p, seqs.answer)
    n_train = train_seqs.n_questions if train_questions is None else len(train_questions)
    return {"C": float(C), "fit_seconds": fit_s, "n_train": int(n_train), "acc": acc, "probs": probs}


def crossfit_plan(questions: np.ndarray, answer: np.ndarray, folds: int, seed: int,
                  pool: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The cross-fitting protocol: (fold id per question, [(fit questions, held-out questions), ...]).

    Fold k fits on the other folds' `questions` and holds out its own (stratified by `answer`, seeded:
    `question_folds`); with a `pool`, one more entry fits on every labelled question and predicts the
    pool. Every fit runs through `fit_predict`, which refuses overlapping fit and predict questions.
    `cross_fit` runs the plan here; `cluster.probes` runs the same plan as Ray tasks."""
    questions = np.asarray(questions, dtype=np.int64)
    fold = question_folds(answer, folds, seed)
    plan = [(questions[fold != k], questions[fold == k]) for k in range(folds)]
    if pool is not None:
        plan.append((questions, np.asarray(pool, dtype=np.int64)))
    return fold, plan


def assemble_oof(fold: np.ndarray, held: list[np.ndarray], width: int) -> np.ndarray:
    """(len(fold), width) out-of-fold probabilities: fold k's held-out predictions in its questions' rows."""
    oof = np.zeros((len(fold), width), dtype=np.float32)
    for k in range(int(fold.max()) + 1):
        oof[fold == k] = held[k]
    return oof


def cross_fit(
    X: np.ndarray, seqs: Sequences, C: float, max_iter: int, folds: int, seed: int,
    questions: np.ndarray | None = None, family: str = "logreg",
) -> np.ndarray:
    """Out-of-fold probabilities (Q_sel, C_max) for `questions` (all when None), in that order: question i
    is labelled by the probe fitted on the other folds' questions only (`crossfit_plan`, run serially)."""
    questions = _all(seqs, questions)
    fold, plan = crossfit_plan(questions, seqs.answer[questions], folds, seed)
    held = [fit_predict(X, seqs, fit_q, held_q, C, max_iter, seed, family) for fit_q, held_q in plan]
    return assemble_oof(fold, held, seqs.max_choices)


def _get(r: Any, key: str, default: Any = KeyError) -> Any:
    if isinstance(r, dict):
        return r[key] if default is KeyError else r.get(key, default)
    return getattr(r, key) if default is KeyError else getattr(r, key, default)


def layers_of(r) -> tuple[int, ...]:
    """The layers a result uses: its `layers` when set, else `(layer,)`."""
    layers = _get(r, "layers", None)
    return tuple(int(x) for x in layers) if layers else (int(_get(r, "layer")),)


def is_single_layer(r) -> bool:
    """True for a one-layer probe, False for a multi-layer candidate (its `layer` is None)."""
    return _get(r, "layer") is not None


def best_result(results):
    """The result with the best VALIDATION accuracy; ties -> smaller C, then fewer layers, then shallower
    layers, then the family listed first, then single-layer before 'concat' before 'ensemble'. Reads only
    `val_acc`, `C`, `layer`/`layers`, `family` and `combine` (the last three if present) of each result."""
    results = list(results)
    if not results:
        raise ValueError("best_result: no probe results")
    families = list(dict.fromkeys(_get(r, "family", "") for r in results))

    def key(r):
        layers = layers_of(r)
        return (-float(_get(r, "val_acc")), float(_get(r, "C")), len(layers), layers,
                families.index(_get(r, "family", "")), _get(r, "combine", None) or "")

    return min(results, key=key)


def best_per_layer(results) -> list:
    """For each layer, its best single-layer result on validation (the probe-accuracy-by-layer curve)."""
    single = [r for r in results if is_single_layer(r)]
    layers = sorted({int(_get(r, "layer")) for r in single})
    return [best_result([r for r in single if int(_get(r, "layer")) == layer]) for layer in layers]


# ---------------------------------------------------------------------------------------------
# Multi-layer candidates


def combine_members(results, k: int, family: str, C: float) -> list[int]:
    """The `k` layers whose single-layer (`family`, `C`) probes score best on VALIDATION (ties: shallower
    layer), in ascending order. The sweep passes the best single-layer family and C, so one family and
    one C serve every multi-layer candidate and its cross-fit."""
    pool = [r for r in results if is_single_layer(r) and _get(r, "family", "logreg") == family
            and float(_get(r, "C")) == float(C)]
    if k < 2 or len(pool) < k:
        raise ValueError(f"combining {k} layers needs k >= 2 and at least k single-layer {family} C={C:g} "
                         f"results, got {len(pool)}; lower probe.combine_layers or store more layers")
    ranked = sorted(pool, key=lambda r: (-float(_get(r, "val_acc")), int(_get(r, "layer"))))
    return sorted(int(_get(r, "layer")) for r in ranked[:k])


def ensemble_choice_probs(prob_arrays, n_choices: np.ndarray) -> np.ndarray:
    """(Q, C_max) normalised geometric mean of per-layer choice probabilities (`ensemble_log_probs`, equal
    weights). Present choices (< n_choices) are floored at the smallest normal float64 first, so a
    probability that underflowed to 0 in one member does not veto its choice; absent ones stay 0."""
    arrays = [np.asarray(p, dtype=np.float64) for p in prob_arrays]
    width = arrays[0].shape[1]
    present = np.arange(width)[None, :] < np.asarray(n_choices)[:, None]
    tiny = np.finfo(np.float64).tiny
    return ensemble_log_probs([np.where(present, np.maximum(p, tiny), 0.0) for p in arrays])


def ensemble_result(members: list[dict], val: Sequences, test: Sequences) -> dict[str, Any]:
    """The 'ensemble' candidate over phase-1 results `members` (one family and C, several layers), built
    from their validation and test probabilities alone: no new fit."""
    val_p = ensemble_choice_probs([m["val_probs"] for m in members], val.n_choices).astype(np.float32)
    test_p = ensemble_choice_probs([m["test_probs"] for m in members], test.n_choices).astype(np.float32)
    return {
        "family": members[0]["family"], "combine": "ensemble", "layer": None,
        "layers": sorted(int(m["layer"]) for m in members), "C": float(members[0]["C"]),
        "val_acc": accuracy(val_p, val.answer), "test_acc": accuracy(test_p, test.answer),
        "val_probs": val_p, "test_probs": test_p, "fit_seconds": float(sum(m["fit_seconds"] for m in members)),
    }


def layer_features(states: dict[int, np.ndarray], layers) -> np.ndarray:
    """The probe's input rows: one layer's states, or several layers' side by side (`concat_layers`)."""
    layers = list(layers)
    return np.asarray(states[layers[0]]) if len(layers) == 1 else concat_layers(states, layers)


def fit_predict_layers(
    states: dict[int, np.ndarray], layers, combine: str | None, seqs: Sequences, fit_questions: np.ndarray,
    predict_questions: np.ndarray, C: float, max_iter: int, seed: int, family: str = "logreg",
) -> np.ndarray:
    """`fit_predict` for any candidate: one layer (`combine` None), 'concat' (one probe on the layers'
    concatenated states) or 'ensemble' (one probe per layer, combined by `ensemble_choice_probs`).
    `states` maps each layer to its (rows, hidden) states over all of `seqs`' rows."""
    layers = list(layers)
    if combine not in (None, "concat", "ensemble") or (combine is None) != (len(layers) == 1):
        raise ValueError(f"combine={combine!r} with layers {layers}: use None with one layer, 'concat' or 'ensemble' with several")
    if combine == "ensemble":
        probs = [fit_predict(states[layer], seqs, fit_questions, predict_questions, C, max_iter, seed, family)
                 for layer in layers]
        return ensemble_choice_probs(probs, seqs.n_choices[np.asarray(predict_questions, dtype=np.int64)])
    X = layer_features(states, layers)
    return fit_predict(X, seqs, fit_questions, predict_questions, C, max_iter, seed, family)


# ---------------------------------------------------------------------------------------------
# Temperature scaling


def _log_probs(probs_or_logits: np.ndarray, is_logits: bool | None) -> np.ndarray:
    """Log-probabilities (-inf where absent) from probs (zeros absent) or logits (-inf absent)."""
    a = np.asarray(probs_or_logits, dtype=np.float64)
    if is_logits is None:
        finite = np.isfinite(a).all()
        is_logits = not (finite and a.min() >= 0 and a.max() <= 1 and np.allclose(a.sum(axis=1), 1, atol=1e-3))
    p = softmax_rows(a) if is_logits else a
    with np.errstate(divide="ignore"):
        return np.log(p)


def _scaled(logp: np.ndarray, T: float) -> np.ndarray:
    return softmax_rows(logp / T)


def fit_temperature(
    probs_or_logits: np.ndarray, answer: np.ndarray, *, is_logits: bool | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature T minimising the NLL of softmax(log p / T) on held-out (OOF) predictions.

    Bounded scalar search over log T (the NLL is convex in 1/T). `is_logits=None` guesses: rows of
    finite values in [0, 1] summing to 1 are probabilities, anything else logits.
    """
    from scipy.optimize import minimize_scalar

    logp = _log_probs(probs_or_logits, is_logits)
    answer = np.asarray(answer, dtype=np.int64)
    idx = np.arange(len(answer))
    if len(answer) == 0:
        return 1.0

    def objective(log_t: float) -> float:
        p = _scaled(logp, float(np.exp(log_t)))[idx, answer]
        return float(-np.mean(np.log(np.maximum(p, 1e-12))))

    res = minimize_scalar(objective, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return t if objective(np.log(t)) <= objective(0.0) else 1.0


def apply_temperature(probs: np.ndarray, T: float) -> np.ndarray:
    """p ** (1/T) renormalised over present (non-zero) choices; zeros stay zero."""
    return _scaled(_log_probs(probs, False), T)


# ---------------------------------------------------------------------------------------------
# What a sweep hands on: its summary, and the best probe's calibrated out-of-fold labels

SUMMARY = ("family", "combine", "layer", "layers", "C", "val_acc", "test_acc", "fit_seconds")
"""The fields of each sweep candidate kept in the probe artifact's meta (the arrays are kept apart)."""


def sweep_summary(results: list[dict], best: dict) -> dict[str, Any]:
    """per_layer (each layer's best candidate), sweep (every candidate) and best, without their arrays."""
    return {"per_layer": [{k: r[k] for k in SUMMARY} for r in best_per_layer(results)],
            "sweep": [{k: r[k] for k in SUMMARY} for r in results],
            "best": {k: best[k] for k in SUMMARY if k != "fit_seconds"}}


def calibrated_labels(oof_raw: np.ndarray, answer: np.ndarray, test_probs: np.ndarray,
                      test_answer: np.ndarray) -> dict[str, Any]:
    """Temperature-scale the best probe on its held-out (OOF) predictions only; the calibrated OOF
    probabilities are the probe labels. Returns them, the raw ones, T, accuracy and ECE before and
    after, and the test probabilities raw and calibrated (reported only)."""
    T = fit_temperature(oof_raw, answer, is_logits=False)
    oof_cal = apply_temperature(oof_raw, T).astype(np.float32)
    test_cal = apply_temperature(test_probs, T).astype(np.float32)
    return {"oof_probs": oof_cal, "oof_probs_raw": oof_raw, "temperature": T, "oof_acc": accuracy(oof_raw, answer),
            "ece_raw": ece(oof_raw, answer), "ece_calibrated": ece(oof_cal, answer),
            "test_probs": test_probs, "test_probs_calibrated": test_cal,
            "test_ece_raw": ece(test_probs, test_answer), "test_ece_calibrated": ece(test_cal, test_answer)}


def pool_labels(pool_raw: np.ndarray, T: float, pool: np.ndarray, withheld_gold: np.ndarray) -> dict[str, Any]:
    """The pool's pseudo-labels, calibrated with the OOF temperature, and their scores against the
    withheld gold (reported only; nothing upstream reads them)."""
    pool_cal = apply_temperature(pool_raw, T).astype(np.float32)
    return {"pool_questions": pool.astype(np.int64), "pool_probs": pool_cal, "pool_probs_raw": pool_raw,
            "n_pool": int(len(pool)), "pool_acc": accuracy(pool_raw, withheld_gold),
            "pool_ece": ece(pool_cal, withheld_gold), "pool_ece_raw": ece(pool_raw, withheld_gold)}
