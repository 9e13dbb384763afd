"""What a run hands its report, as types: the parts of `report.json` the report reads.

`RunResults` and its sections are dataclasses, and `check(RunResults, results)` walks a results dict
against them: a field without a default must be there, a number must be a number (int, float or a
numpy scalar; not bool), a nested section is checked in turn, and extra keys are allowed (the report
keeps everything it is given). A wrong results dict fails with one `ValueError` naming the dotted key.
`engine.report` checks with it before anything is written; the pipeline builds its results with
`StudentRecord`, the typed form of a student artifact's meta.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

NON_EMPTY = {"non_empty": True}


@dataclass(frozen=True)
class ProbeEntry:
    """One probe candidate: a single layer, or (layer null) a multi-layer combination."""

    layer: Optional[int]
    val_acc: Optional[float]
    test_acc: Optional[float]


@dataclass(frozen=True)
class ProbesSection:
    per_layer: list[ProbeEntry] = field(metadata=NON_EMPTY)
    """Each layer's best candidate, single layers only."""
    best: ProbeEntry
    """The candidate chosen on validation."""


@dataclass(frozen=True)
class TeacherSection:
    test_acc: float
    """The teacher's own answer (its choice log-likelihoods), on test."""


@dataclass(frozen=True)
class BaselineSection:
    n_questions: int
    test_acc: float


@dataclass(frozen=True)
class StudentRow:
    source: str
    test_acc: float


@dataclass(frozen=True)
class RunResults:
    """One pipeline run on a dataset's test split (see `engine.report` for every key)."""

    dataset: str
    mode: str
    teacher: str
    splits: dict
    """{split: number of questions}"""
    teacher_logit: TeacherSection
    probes: ProbesSection
    vllm_baseline: Optional[BaselineSection] = None
    students: Optional[list[StudentRow]] = None
    labels: Optional[dict] = None
    timings: Optional[dict] = None
    versions: Optional[dict] = None
    config: Optional[dict] = None


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"report results: {key}: {msg}")


def is_num(x: Any) -> bool:
    """int, float or a numpy scalar; never bool or str."""
    if isinstance(x, (bool, str, bytes)):
        return False
    return isinstance(x, (int, float)) or hasattr(x, "__float__")


def _check_value(tp: Any, value: Any, where: str, meta: Mapping) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        check(tp, value, where)
    elif tp in (int, float):
        if not is_num(value):
            _fail(where, f"expected a number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            _fail(where, "expected a string")
    elif tp is dict:
        if not isinstance(value, Mapping):
            _fail(where, "expected a dict")
    elif origin is list:
        if not isinstance(value, (list, tuple)) or (meta.get("non_empty") and not value):
            _fail(where, "expected a " + ("non-empty " if meta.get("non_empty") else "") + "list")
        for i, item in enumerate(value):
            _check_value(args[0], item, f"{where}[{i}]", {})


def check(cls: type, data: Any, where: str = "") -> None:
    """Check `data` (a dict) against the dataclass `cls`; raise `ValueError` naming the first missing or
    malformed key as a dotted path."""
    if not isinstance(data, Mapping):
        if not where:
            raise ValueError(f"report results: expected a dict, got {type(data).__name__}")
        _fail(where, f"expected a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(name, "missing required key")
            continue
        _check_value(hints[f.name], data[f.name], name, f.metadata)


# ---------------------------------------------------------------------------------------------
# A trained student as the pipeline hands it on


@dataclass(frozen=True)
class StudentRecord:
    """A committed student: what its artifact's meta.json says, typed, and where the artifact is
    (its `test_probs.npy`, `val_probs.npy` and `model/` folder)."""

    source: str
    seed: int
    test_acc: float
    val_acc: Optional[float]
    best_epoch: Optional[int]
    train_label_acc: float
    """Agreement of its train labels with gold (for the pseudo sources: against the withheld gold)."""
    artifact: str
    train_fraction: float = 1.0
    n_train: Optional[int] = None
    epochs: Optional[int] = None
    train_seconds: Optional[float] = None
    history: list = field(default_factory=list)
    """Per epoch: epoch, train_loss, seconds, val_acc, val_loss, val_seconds."""
    finetune: Optional[str] = None
    stage_seconds: Optional[float] = None
    """Its share of its Ray Train run's wall time."""
    config_hash: Optional[str] = None
    ray_train_run: Optional[str] = None
    fit_window: Optional[list] = None
    """Wall clock [start, end] of its Ray Train run's fit(), shared by the run's students."""

    @classmethod
    def from_meta(cls, meta: Mapping, artifact: str) -> StudentRecord:
        """From an artifact's meta.json (keys it does not know, such as the config, are left there)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"artifact"}
        return cls(artifact=str(artifact), **{k: v for k, v in meta.items() if k in names})
