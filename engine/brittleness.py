"""Brittleness: the same test questions asked under other answer formats and choice orders.

The teacher's letter logits pass through the vocabulary, so how labels are written (' A', 'A', '(A)',
'1.') and the order of the choices change its accuracy. A `Variant` is one way of asking; the
baseline stage scores every variant with the teacher (letter logits) and, in letter mode, with the
chosen probe, and `spread` summarises each column across variants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from engine.tasks import Example


@dataclass(frozen=True)
class Variant:
    """Ask every question with labels written as `answer_format`; `permutation` 0 keeps the data's
    choice order, k >= 1 is the k-th seeded random order."""

    answer_format: str
    permutation: int = 0

    @property
    def name(self) -> str:
        order = "original order" if self.permutation == 0 else f"permutation {self.permutation}"
        return f"{self.answer_format!r}, {order}"


def variants(formats: tuple[str, ...], base_format: str, permutations: int) -> list[Variant]:
    """Every format in the data's order, then `permutations` random orders under `base_format`."""
    out = [Variant(f) for f in dict.fromkeys(formats)]
    return out + [Variant(base_format, k) for k in range(1, permutations + 1)]


def choice_order(n: int, seed: int, permutation: int, question: int) -> np.ndarray:
    """Order of the n choices in `permutation` (0: identity) for the question at index `question`.

    Seeded per (seed, permutation, question), so a question's order does not depend on which
    other questions are asked. A non-identity order is drawn whenever n >= 2.
    """
    if permutation == 0 or n < 2:
        return np.arange(n)
    rng = np.random.default_rng([seed, permutation, question])
    while True:
        order = rng.permutation(n)
        if not np.array_equal(order, np.arange(n)):
            return order


def permute(examples: list[Example], seed: int, permutation: int) -> list[Example]:
    """The examples with choices reordered by `choice_order`; `answer` follows the gold choice."""
    out = []
    for q, ex in enumerate(examples):
        order = choice_order(len(ex.choices), seed, permutation, q)
        new_answer = int(np.flatnonzero(order == ex.answer)[0])
        out.append(replace(ex, choices=tuple(ex.choices[i] for i in order), answer=new_answer))
    return out


def spread(accs: list[float | None]) -> dict[str, float] | None:
    """min, max, range (max - min) and population std of the accuracies present; None if none."""
    a = np.asarray([x for x in accs if x is not None], dtype=np.float64)
    if not len(a):
        return None
    return {"min": float(a.min()), "max": float(a.max()), "range": float(a.max() - a.min()), "std": float(a.std())}
