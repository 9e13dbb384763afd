"""Student label matrices: (Q, C_max) float32, each row summing to 1 over the question's present choices
and 0 elsewhere. Sources: 'gold' (one-hot answers), 'logit' (the teacher's own choice scores),
'probe' (out-of-fold probe probabilities); the mixes 'gold+logit' and 'gold+probe' (the teacher's or
probe's labels, with a gold term in the loss: `loss_alpha`); and the semi-supervised 'probe_pseudo' and
'logit_pseudo' (gold on the labelled questions, the probe's or the teacher's predictions on the
unlabelled pool; `pseudo_labelled`). Hard labels are the one-hot argmax of the soft ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.metrics import accuracy, softmax_rows

PROVIDERS = ("gold", "logit", "probe")
"""Where labels come from: the gold answers, the teacher's own choice scores (`logit_targets`, needs
`extract.teacher_scores`), or the out-of-fold probe probabilities (`probe_targets`)."""


@dataclass(frozen=True)
class LabelSource:
    """One way to supervise a student: one entry in `SOURCES`, which the config's checks, the label
    making, the loss weight, the benchmark and the report all read."""

    name: str
    """What `student.label_sources` and `bench.sources` call it."""
    labels: str
    """Whose labels it trains on where it has no gold: one of `PROVIDERS`."""
    doc: str
    """One line for the docs."""
    mix: bool = False
    """A gold cross-entropy term joins the loss, weighted 1 - `student.mix_alpha`."""
    pseudo: bool = False
    """Semi-supervised: gold on the labelled train questions, `labels`' predictions on the unlabelled pool
    (`probe.label_pool`), so it needs `data.train_fraction` < 1."""


SOURCES: dict[str, LabelSource] = {s.name: s for s in (
    LabelSource("gold", "gold", "the gold answers, one-hot"),
    LabelSource("logit", "logit", "the teacher's own choice scores, softmaxed"),
    LabelSource("probe", "probe", "the out-of-fold probe probabilities, calibrated"),
    LabelSource("gold+logit", "logit", "the teacher's labels with a gold term in the loss", mix=True),
    LabelSource("gold+probe", "probe", "the probe's labels with a gold term in the loss", mix=True),
    LabelSource("probe_pseudo", "probe", "gold, plus the probe's labels on the unlabelled pool", pseudo=True),
    LabelSource("logit_pseudo", "logit", "gold, plus the teacher's labels on the unlabelled pool (the fair "
                "baseline of probe_pseudo)", pseudo=True),
)}
"""Every label source, by name."""


def label_source(name: str) -> LabelSource:
    """The label source called `name`, or a ValueError listing the known ones."""
    if name not in SOURCES:
        raise ValueError(f"label source must be one of {tuple(SOURCES)}, got {name!r}")
    return SOURCES[name]


def base_source(name: str) -> str:
    """Whose labels a source trains on where it has no gold: 'gold', 'logit' or 'probe'."""
    return label_source(name).labels


def loss_alpha(name: str, alpha: float, mix_alpha: float) -> float:
    """The weight of the soft-label term for `name` (the rest is gold cross-entropy): `mix_alpha` for
    the mixes, `alpha` otherwise. The pseudo sources carry gold as labels, so they take `alpha` too."""
    return mix_alpha if label_source(name).mix else alpha


def _present(n_choices: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width)[None, :] < np.asarray(n_choices)[:, None]


def _renorm(p: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Zero absent choices and renormalise; a row with no mass becomes uniform over its present choices."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    if present is None:
        present = np.ones(p.shape, dtype=bool)
    p = np.where(present, np.nan_to_num(p, nan=0.0, posinf=0.0), 0.0)
    s = p.sum(axis=1, keepdims=True)
    uniform = present / np.maximum(present.sum(axis=1, keepdims=True), 1)
    return np.where(s > 0, p / np.where(s > 0, s, 1.0), uniform).astype(np.float32)


def _fit_width(a: np.ndarray, width: int, fill: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape[1] >= width:
        return a[:, :width]
    return np.concatenate([a, np.full((len(a), width - a.shape[1]), fill)], axis=1)


def gold_targets(answer: np.ndarray, n_choices: np.ndarray, width: int | None = None) -> np.ndarray:
    """One-hot gold answers, (Q, width) float32 (width defaults to max n_choices)."""
    answer, n_choices = np.asarray(answer, dtype=np.int64), np.asarray(n_choices, dtype=np.int64)
    width = int(n_choices.max()) if width is None else int(width)
    if len(answer) and (np.any(answer < 0) or np.any(answer >= n_choices) or np.any(n_choices > width)):
        raise ValueError("gold_targets: every answer must index one of its question's choices, within width")
    out = np.zeros((len(answer), width), dtype=np.float32)
    out[np.arange(len(answer)), answer] = 1.0
    return out


def logit_targets(teacher_logp: np.ndarray, n_choices: np.ndarray | None = None) -> np.ndarray:
    """Softmax of the teacher's choice log-scores over present choices (-inf marks absent ones)."""
    z = np.asarray(teacher_logp, dtype=np.float64)
    present = np.isfinite(z) if n_choices is None else _present(n_choices, z.shape[1])
    return _renorm(softmax_rows(np.where(present, z, -np.inf)), present)


def probe_targets(oof_probs: np.ndarray, n_choices: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probe probabilities, renormalised over present choices."""
    p = np.asarray(oof_probs, dtype=np.float64)
    return _renorm(p, None if n_choices is None else _present(n_choices, p.shape[1]))


def hard(targets: np.ndarray) -> np.ndarray:
    """One-hot of each row's argmax (same shape, float32)."""
    t = np.asarray(targets)
    out = np.zeros(t.shape, dtype=np.float32)
    if t.size:
        out[np.arange(len(t)), t.argmax(axis=1)] = 1.0
    return out


def label_agreement(targets: np.ndarray, answer: np.ndarray) -> float:
    """How often a label source's argmax is the gold answer: how clean the labels are on train."""
    return accuracy(targets, answer)


def make_targets(
    source: str,
    *,
    answer: np.ndarray,
    n_choices: np.ndarray,
    teacher_logp: np.ndarray | None = None,
    probe_probs: np.ndarray | None = None,
    soft: bool = True,
) -> np.ndarray:
    """(Q, max n_choices) float32 labels from `source`; hard (one-hot argmax) unless `soft`. Gold is one-hot."""
    n_choices = np.asarray(n_choices, dtype=np.int64)
    width = int(n_choices.max()) if len(n_choices) else 0
    labels = base_source(source)  # a mix's soft term takes these labels; its gold term comes from the loss
    if labels == "gold":
        return gold_targets(answer, n_choices, width)
    if labels == "logit":
        if teacher_logp is None:
            raise ValueError("make_targets('logit') needs teacher_logp")
        t = logit_targets(_fit_width(teacher_logp, width, -np.inf), n_choices)
    else:
        if probe_probs is None:
            raise ValueError("make_targets('probe') needs probe_probs")
        t = probe_targets(_fit_width(probe_probs, width, 0.0), n_choices)
    if len(t) != len(n_choices):
        raise ValueError(f"make_targets({source!r}): {len(t)} label rows for {len(n_choices)} questions")
    return t if soft else hard(t)


def pseudo_labelled(
    answer: np.ndarray, n_choices: np.ndarray, pool_probs: np.ndarray, pool_n_choices: np.ndarray, *, soft: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Semi-supervised labels for [labelled questions; pool questions], in that order.

    `pool_probs`: the pool's label probabilities, the probe's ('probe_pseudo') or the softmax of the
    teacher's choice scores ('logit_pseudo', `logit_targets`). Returns (targets, answer_used): one-hot
    gold on the labelled questions and the pool labels (hard argmax unless `soft`), and, as the answers
    any gold loss term may use, the gold answers followed by the pool labels' argmax: the pool's
    withheld gold is never an input.
    """
    n_all = np.concatenate([np.asarray(n_choices, np.int64), np.asarray(pool_n_choices, np.int64)])
    width = int(n_all.max()) if len(n_all) else 0
    gold = gold_targets(answer, n_choices, width)
    pool = probe_targets(_fit_width(pool_probs, width, 0.0), pool_n_choices)
    pool = pool if soft else hard(pool)
    targets = np.concatenate([gold, pool]).astype(np.float32)
    used = np.concatenate([np.asarray(answer, np.int64), pool.argmax(axis=1).astype(np.int64)])
    return targets, used
