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

import numpy as np

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


def _fail(key: str, msg: str, label: str = "report results") -> None:
    raise ValueError(f"{label}: {key}: {msg}")


def is_num(x: Any) -> bool:
    """int, float or a numpy scalar; never bool or str."""
    if isinstance(x, (bool, str, bytes)):
        return False
    return isinstance(x, (int, float)) or hasattr(x, "__float__")


def _check_value(tp: Any, value: Any, where: str, meta: Mapping, label: str = "report results") -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        check(tp, value, where, label=label)
    elif tp in (int, float):
        if not is_num(value):
            _fail(where, f"expected a number, got {value!r}", label)
    elif tp is str:
        if not isinstance(value, str):
            _fail(where, "expected a string", label)
    elif tp is dict:
        if not isinstance(value, Mapping):
            _fail(where, "expected a dict", label)
    elif tp is np.ndarray:
        if not isinstance(value, np.ndarray):
            _fail(where, f"expected an array, got {type(value).__name__}", label)
    elif origin is list:
        if not isinstance(value, (list, tuple)) or (meta.get("non_empty") and not value):
            _fail(where, "expected a " + ("non-empty " if meta.get("non_empty") else "") + "list", label)
        for i, item in enumerate(value):
            _check_value(args[0], item, f"{where}[{i}]", {}, label)


def check(cls: type, data: Any, where: str = "", *, label: str = "report results") -> None:
    """Check `data` (a dict) against the dataclass `cls`; raise `ValueError` naming the first missing or
    malformed key as a dotted path, after `label` (what is checked)."""
    if not isinstance(data, Mapping):
        if not where:
            raise ValueError(f"{label}: expected a dict, got {type(data).__name__}")
        _fail(where, f"expected a dict, got {type(data).__name__}", label)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(name, "missing required key", label)
            continue
        _check_value(hints[f.name], data[f.name], name, f.metadata, label)


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
    """Per epoch: epoch, train_loss, seconds, cpu_user_seconds, cpu_system_seconds, page_faults (the
    training's, in its worker's process), peak_rss_mib (that process's, so far), val_acc, val_loss,
    val_seconds."""
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


# ---------------------------------------------------------------------------------------------
# The probe and baseline stages as the pipeline hands them on


def _from_artifact(cls: type, meta: Mapping, arrays: Mapping, label: str, **known: Any) -> Any:
    """`cls` from an artifact's meta.json and arrays (one namespace: the array names are not meta keys),
    checked with `check`; `meta` keeps the meta.json as read, which the report's sections are cut from."""
    data = {**meta, **arrays}
    check(cls, data, label=label)
    names = {f.name for f in dataclasses.fields(cls)} - {"meta", *known}
    return cls(**{k: v for k, v in data.items() if k in names}, **known, meta=dict(meta))


PROBE_REPORT_KEYS = ("per_layer", "sweep", "best", "oof_acc", "temperature", "ece_raw", "ece_calibrated", "n_pool",
                     "pool_acc", "pool_ece")
"""The probe artifact's keys the report's `probes` section holds, in this order (those present)."""


@dataclass(frozen=True, eq=False)
class ProbeStage:
    """The probe stage's result: its artifact (`<out>/probes-<id>/`) typed: the sweep's summary from its
    meta.json and the label arrays the students train on. The artifact on disk is unchanged. (Compared
    by identity: its arrays have no plain ==.)"""

    per_layer: list[dict] = field(metadata=NON_EMPTY)
    """Each layer's best candidate, single layers only: {family, combine, layer, layers, C, val_acc,
    test_acc, fit_seconds, ...} as `engine.probes.sweep_summary` writes it."""
    sweep: list[dict] = field(metadata=NON_EMPTY)
    """Every candidate, single layers and combinations."""
    best: dict
    """The candidate chosen on validation (no fit_seconds)."""
    oof_acc: float
    """The best candidate's out-of-fold accuracy on the labelled train questions."""
    temperature: float
    """Fitted on the OOF predictions only."""
    ece_raw: float
    ece_calibrated: float
    """OOF expected calibration error before and after the temperature."""
    oof_probs: np.ndarray
    """(labelled train questions, C_max) calibrated OOF probabilities: the probe students' labels."""
    test_probs: np.ndarray
    """(test questions, C_max) the best candidate's raw test probabilities."""
    test_ece_raw: Optional[float] = None
    test_ece_calibrated: Optional[float] = None
    n_pool: Optional[int] = None
    """With `probe.label_pool`: the unlabelled train questions given pseudo-labels."""
    pool_acc: Optional[float] = None
    """The pool's pseudo-labels against the withheld gold (reported only)."""
    pool_ece: Optional[float] = None
    pool_ece_raw: Optional[float] = None
    stage_seconds: Optional[float] = None
    config_hash: Optional[str] = None
    seconds: Optional[dict] = None
    """{sweep, crossfit}: wall seconds of the two phases."""
    oof_probs_raw: Optional[np.ndarray] = None
    test_probs_calibrated: Optional[np.ndarray] = None
    train_questions: Optional[np.ndarray] = None
    """The labelled train questions (`data.train_fraction`), the rows of `oof_probs`."""
    pool_questions: Optional[np.ndarray] = None
    pool_probs: Optional[np.ndarray] = None
    """(pool questions, C_max) calibrated pseudo-labels, rows in `pool_questions` order."""
    pool_probs_raw: Optional[np.ndarray] = None
    artifact: Optional[str] = None
    """The artifact's folder."""
    meta: dict = field(default_factory=dict, repr=False)
    """The artifact's meta.json as read (with what is not typed here: config, identity, files)."""

    @classmethod
    def from_artifact(cls, meta: Mapping, arrays: Mapping, artifact: Any = None) -> ProbeStage:
        """From `engine.artifacts.load`'s (meta, arrays); a malformed artifact raises one `ValueError`
        naming the key."""
        where = f"probe artifact {artifact}" if artifact is not None else "probe artifact"
        return _from_artifact(cls, meta, arrays, where, artifact=None if artifact is None else str(artifact))

    def to_report(self) -> dict:
        """The report's `probes` section: exactly what the artifact's meta.json has under those keys."""
        return {k: self.meta[k] for k in PROBE_REPORT_KEYS if k in self.meta}


@dataclass(frozen=True)
class BaselineStage:
    """The baseline stage's result: the teacher scored by vLLM on a test sample (`<out>/baseline-<id>/`),
    typed from its meta.json. Its arrays (questions.npy, logp.npy) stay on disk: no stage reads them."""

    n_questions: int
    test_acc: float
    """The teacher's accuracy under vLLM on those questions."""
    tokens_per_s: float
    startup_s: float
    dtype: str
    config_hash: str
    transformers_test_acc_same_questions: Optional[float] = None
    """With `extract.teacher_scores`: the extraction forward's accuracy on the same questions."""
    max_abs_diff_vs_transformers: Optional[float] = None
    brittleness: Optional[dict] = None
    """With `baseline.formats`/`baseline.permutations`: the table (`cluster.brittleness.brittleness`)."""
    stage_seconds: Optional[float] = None
    artifact: Optional[str] = None
    meta: dict = field(default_factory=dict, repr=False)
    """The meta as the stage wrote it, or as read back (then with identity, identity_hash, files)."""

    @classmethod
    def from_meta(cls, meta: Mapping, artifact: Any = None) -> BaselineStage:
        """From the artifact's meta (as `engine.artifacts.load` reads it, or as the stage wrote it); a
        malformed one raises one `ValueError` naming the key."""
        where = f"baseline artifact {artifact}" if artifact is not None else "baseline artifact"
        return _from_artifact(cls, meta, {}, where, artifact=None if artifact is None else str(artifact))

    def to_report(self) -> dict:
        """The report's `vllm_baseline` section: the meta it was made from."""
        return dict(self.meta)
