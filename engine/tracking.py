"""Optional experiment tracking (`tracking.*`): one MLflow run per `distill` command.

    tracker = open_tracker(cfg)                  # Tracker (records nothing) unless tracking.mlflow
    with recording(tracker, cfg, "run"):         # the run: FINISHED, or FAILED / KILLED on an exception
        log_students(tracker, students)          # per-epoch curves, step = epoch, e.g. gold/val_acc
        log_report(tracker, results, out_dir)    # teacher and baseline accuracy, report.{json,md}, the plot

mlflow is imported only when tracking is on; with `tracking.uri` null the run goes to the file store
`<out_dir>/mlruns`, which needs no server and works offline. What is recorded decides no artifact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.config import Config, ConfigError, config_hash, to_dict
from engine.log import WARNING, log
from engine.report import PLOT_PNG, REPORT_JSON, REPORT_MD
from engine.results import ProbeStage, StudentRecord

INSTALL = "pip install 'probe-kd[track]'"
REPORT_FILES = (REPORT_JSON, REPORT_MD, PLOT_PNG)
BENCH_FILES = ("bench.json", "bench.md", "bench_*.png")
EPOCH_KEYS = ("train_loss", "val_acc", "val_loss", "seconds")
STUDENT_KEYS = {"test_acc": "test_acc", "val_acc": "best_val_acc", "best_epoch": "best_epoch",
                "train_label_acc": "train_label_acc", "train_seconds": "train_seconds"}
"""A student's final numbers: its `StudentRecord` field -> the metric's name under its label source."""


class Tracker:
    """Records nothing: what every command gets with `tracking.mlflow` off."""

    run_id: str | None = None

    def start(self, cfg: Config, command: str) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    """One MLflow run through `MlflowClient` (no global active run, so threads and tests do not mix)."""

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client_cls = MlflowClient
        self.client = None

    def start(self, cfg: Config, command: str) -> None:
        uri = tracking_uri(cfg)
        if uri.startswith("file:") or "://" not in uri:  # a file store: MLflow >= 3.13 keeps it only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._client_cls(uri)
        t = cfg.tracking
        exp = self.client.get_experiment_by_name(t.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(t.experiment)
        name = t.run_name or f"{command} {cfg.out_dir}"
        self.run_id = self.client.create_run(exp_id, run_name=name, tags={"distill.command": command}).info.run_id
        log("tracking", f"MLflow run {self.run_id} ({name!r}) in experiment {t.experiment!r} at {uri}")
        self.log_params(config_params(cfg))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log_metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step or 0) for k, v in values.items() if _is_number(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


def open_tracker(cfg: Config) -> Tracker:
    """The tracker `cfg.tracking` asks for; a ConfigError naming the field when mlflow is not installed."""
    if not cfg.tracking.mlflow:
        return Tracker()
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"tracking.mlflow: MLflow is not installed; {INSTALL}, or set tracking.mlflow=false")
    return MlflowTracker()


@contextmanager
def recording(tracker: Tracker, cfg: Config, command: str) -> Iterator[Tracker]:
    """Start the run; end it FINISHED, or KILLED (Ctrl-C) / FAILED (any exception), which is re-raised."""
    tracker.start(cfg, command)
    try:
        yield tracker
    except BaseException as err:
        _end_quietly(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")


def _end_quietly(tracker: Tracker, status: str) -> None:
    """End a failed run without hiding the failure behind a tracking error."""
    try:
        tracker.end(status)
    except Exception as err:  # noqa: BLE001 - the command's own exception is the one to report
        log("tracking", f"could not mark the MLflow run {status}: {err}", WARNING)


def tracking_uri(cfg: Config) -> str:
    """`tracking.uri`, or the file store `file:<out_dir>/mlruns` (absolute)."""
    return cfg.tracking.uri or (Path(cfg.out_dir).resolve() / "mlruns").as_uri()


def config_params(cfg: Config) -> dict[str, Any]:
    """The config as given, as flat dotted keys ('student.epochs'), with its `config_hash` (the one the CLI
    prints), and what each `dtype: auto` becomes here ('resolved.student.dtype'; see `engine.hardware`)."""
    from engine.hardware import resolve

    dtypes = {f"resolved.{section}.dtype": c["dtype"] for section, c in resolve(cfg)[1].items()}
    return {**flatten(to_dict(cfg)), "config_hash": config_hash(cfg), **dtypes}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, '_-. /'): 'gold+probe/val_acc' -> 'gold_plus_probe/val_acc'."""
    return re.sub(r"[^\w\-. /]", "_", name.replace("+", "_plus_"))


def _param_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# What a command records


def log_students(tracker: Tracker, students: list[StudentRecord]) -> None:
    """Each student's per-epoch history (step = epoch) and its final numbers, under its label source."""
    for s in students:
        for h in s.history:
            tracker.log_metrics({f"{s.source}/{k}": h.get(k) for k in EPOCH_KEYS}, step=int(h["epoch"]))
        tracker.log_metrics({f"{s.source}/{name}": getattr(s, k) for k, name in STUDENT_KEYS.items()})


def log_probe(tracker: Tracker, probes: ProbeStage | None) -> None:
    """The probe sweep's best candidate and its out-of-fold label accuracy, under 'probe_sweep/' ('probe/'
    is the student trained on the probe's labels)."""
    if probes is not None:
        best = probes.best
        tracker.log_metrics({"probe_sweep/val_acc": best.get("val_acc"), "probe_sweep/test_acc": best.get("test_acc"),
                             "probe_sweep/oof_acc": probes.oof_acc, "probe_sweep/temperature": probes.temperature})


def log_timings(tracker: Tracker, timings: dict) -> None:
    tracker.log_metrics({f"seconds/{k}": v for k, v in timings.items()})


def log_report(tracker: Tracker, results: dict, out_dir: str | Path) -> None:
    """A run's reference accuracies (teacher, vLLM baseline, chance), its report files, and the hash of the
    config the report records (with `dtype: auto` resolved) as the param `report.config_hash`."""
    tracker.log_params({"report.config_hash": results.get("config_hash")})
    base = results.get("vllm_baseline") or {}
    tracker.log_metrics({"teacher/test_acc": results.get("teacher_logit", {}).get("test_acc"),
                         "baseline/test_acc": base.get("test_acc"), "chance": results.get("chance")})
    log_files(tracker, out_dir, REPORT_FILES)


def log_bench(tracker: Tracker, results: dict, out_dir: str | Path) -> None:
    """Every cell's numbers, each summary row's mean over seeds, the timings, and bench.{json,md} + plots."""
    for c in results.get("cells", []):
        cell = f"{c['dataset']}/{c['regime']}/{c['source']}/fraction_{c['fraction']:g}/seed_{c['seed']}"
        tracker.log_metrics({f"{cell}/{name}": c.get(k) for k, name in STUDENT_KEYS.items()})
    for r in results.get("summary", []):
        row = f"{r['dataset']}/{r['regime']}/{r['source']}/fraction_{r['fraction']:g}"
        tracker.log_metrics({f"{row}/mean": r["mean"], f"{row}/lo": r["lo"], f"{row}/hi": r["hi"]})
    for dataset, seconds in results.get("dataset_seconds", {}).items():
        log_timings(tracker, {f"{dataset}/{k}": v for k, v in seconds.items()})
    log_timings(tracker, {"total": results.get("wall_seconds")})
    log_files(tracker, out_dir, BENCH_FILES)


def log_files(tracker: Tracker, out_dir: str | Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in sorted(Path(out_dir).glob(pattern)):
            tracker.log_artifact(path)
