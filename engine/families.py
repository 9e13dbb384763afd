"""Probe families: each is one entry in `FAMILIES`, and that entry is all the engine needs.

A family builds a fresh, unfitted scikit-learn estimator from (C, max_iter, seed). The sweep fits it
on the stored states of the train rows and reads, in per-choice mode, its `decision_function` (one
score per row, softmaxed within each question) and, in letter mode, its `predict_proba` and
`classes_`. A `grouped` family is also given each row's question (`fit(X, y, groups=...)`): it scores
choices within a question, so it needs per-choice rows (the config refuses it in letter mode).

`probe.families` names the families a run sweeps; the config checks the names against this table,
`tests/test_probes.py` runs every entry through the estimator contract and a planted-signal fit, and
README "Adding a probe family" walks through adding one. scikit-learn is imported only when a family
builds its estimator, so reading a config stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeFamily:
    name: str
    """What `probe.families` calls it."""
    build: Callable[[float, int, int], Any]
    """(C, max_iter, seed) -> a fresh estimator; C has LogisticRegression's meaning (larger: less
    regularised)."""
    doc: str
    """One line for the docs: what the probe is."""
    grouped: bool = False
    """Fitted with `groups` (each row's question); per-choice mode only."""


def _logreg(C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def _conditional_logit(C: float, max_iter: int, seed: int):
    from engine.probe_models import ConditionalLogitProbe

    return ConditionalLogitProbe(C=C, max_iter=max_iter)


def _mlp(C: float, max_iter: int, seed: int):
    from engine.probe_models import MLPProbe

    return MLPProbe(C=C, max_iter=max_iter, seed=seed)


FAMILIES: dict[str, ProbeFamily] = {f.name: f for f in (
    ProbeFamily("logreg", _logreg, "StandardScaler + logistic regression (lbfgs; multinomial over letters)"),
    ProbeFamily("conditional_logit", _conditional_logit,
                "one linear scorer shared by the choices, softmaxed within each question", grouped=True),
    ProbeFamily("mlp", _mlp, "StandardScaler + a one-hidden-layer MLP"),
)}
"""Every probe family, by name."""


def family(name: str) -> ProbeFamily:
    """The family called `name`, or a ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"probe family {name!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
