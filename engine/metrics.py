"""Metrics over (Q, C_max) choice-probability matrices: zeros (probs) or -inf (logits) mark absent choices."""

from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, answer: np.ndarray) -> float:
    """Fraction of rows whose argmax is the gold answer (nan for no rows). Ties go to the first choice."""
    probs, answer = np.asarray(probs), np.asarray(answer)
    if len(answer) == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, axis=1) == answer))


def ece(probs: np.ndarray, answer: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the max-prob confidence, `n_bins` equal-width bins (lo, hi].

    ECE = sum_b (n_b / N) |acc_b - conf_b|; a confidence of exactly 0 falls in the first bin.
    """
    probs, answer = np.asarray(probs, dtype=np.float64), np.asarray(answer)
    if len(answer) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == answer).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(answer))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row softmax over finite entries; -inf entries (absent choices) get 0. An all -inf row gives zeros."""
    z = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(z)
    top = np.where(finite, z, -np.inf).max(axis=1, keepdims=True) if z.size else np.zeros((len(z), 1))
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(finite, np.exp(np.where(finite, z - top, 0.0)), 0.0)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def nll(probs: np.ndarray, answer: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the gold answer (clipped at `eps`)."""
    probs = np.asarray(probs, dtype=np.float64)
    p = probs[np.arange(len(answer)), np.asarray(answer)]
    return float(-np.mean(np.log(np.maximum(p, eps))))


def bootstrap_accuracy(correct, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, lo, hi): a 95% percentile-bootstrap interval over the test questions."""
    c = np.asarray(correct, dtype=np.float64)
    if len(c) == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(c), size=(n_boot, len(c)))
    means = c[idx].mean(axis=1)
    return float(c.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(correct_a, correct_b, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy of A minus B on the same questions: the difference, its 95% paired-bootstrap interval
    (questions resampled together), and McNemar's exact p-value on the questions where they disagree."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} vs {b.shape}; both must score the same questions")
    d = a - b
    if len(d) == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_mcnemar": float("nan"), "n": 0}
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"diff": float(d.mean()), "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5)),
            "p_mcnemar": p, "only_a": only_a, "only_b": only_b, "n": int(len(d))}


def seeds_and_questions_bootstrap(scores, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a per-(seed, question) score over seeds and test questions, with a 95% interval that
    accounts for both the seeds and the finite test set.

    `scores` is (S, N): row s scores the N test questions under seed s (1/0 correctness for an
    accuracy; a - b for a paired difference of two label sources). Every seed scored the same test
    questions, so one bootstrap draw resamples the questions once (the same resample for every seed,
    which keeps the pairing) and the seeds with replacement, and takes the mean. With one seed it is
    the paired bootstrap over questions. Returns {mean, lo, hi, n_seeds, n_questions, per_seed}."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"seeds_and_questions_bootstrap: want (seeds, questions) scores, got shape {x.shape}")
    s, n = x.shape
    rng = np.random.default_rng(seed)
    q_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (B, N) question resamples
    per_seed = x @ q_counts.T / n  # (S, B): each seed's mean over each draw's questions
    s_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)  # (B, S) seed resamples
    draws = (s_counts * per_seed.T).sum(axis=1) / s
    return {"mean": float(x.mean()), "lo": float(np.percentile(draws, 2.5)), "hi": float(np.percentile(draws, 97.5)),
            "n_seeds": int(s), "n_questions": int(n), "per_seed": [float(v) for v in x.mean(axis=1)]}


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether a 95% interval [lo, hi] of a difference lies wholly on one side of zero."""
    return bool(lo > 0.0 or hi < 0.0)
