"""Experiment tracking (`tracking.*`): off by default (no mlflow import, no mlruns folder); on, one MLflow run
per command in a local file store, read back here with `MlflowClient`: the config's params, per-epoch
student metrics, stage summaries and the report files. The end-to-end check (`assert_tracked_run`) runs
inside the `distill run` test of tests/test_cli.py that trains two students for two epochs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from engine import tracking
from engine.config import ConfigError, config_hash, load
from engine.results import StudentRecord


def _client(uri: str):
    """A reader of the file store (MLflow >= 3.13 opens one only with MLFLOW_ALLOW_FILE_STORE)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def _runs(uri: str, experiment: str = "probe-kd") -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_defaults_and_bad_values():
    cfg = load(REPO / "configs/tiny.yaml")
    assert not cfg.tracking.mlflow and cfg.tracking.uri is None and cfg.tracking.experiment == "probe-kd"
    assert type(tracking.open_tracker(cfg)) is tracking.Tracker
    for override, field in (("tracking.uri=' '", "tracking.uri"), ("tracking.experiment=''", "tracking.experiment"),
                            ("tracking.run_name=''", "tracking.run_name"), ("tracking.mlflow=yes please", "tracking.mlflow")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load(REPO / "configs/tiny.yaml", [override])


def test_tracking_settings_decide_no_artifact():
    from cluster.pipeline import baseline_dir, probe_dir, student_dir

    off = load(REPO / "configs/tiny.yaml")
    on = load(REPO / "configs/tiny.yaml", ["tracking.mlflow=true", "tracking.uri=file:/tmp/x", "tracking.run_name=a"])
    assert probe_dir(on) == probe_dir(off) and baseline_dir(on) == baseline_dir(off)
    assert student_dir(on, "gold") == student_dir(off, "gold")


def test_missing_mlflow_is_one_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load(REPO / "configs/tiny.yaml", [f"out_dir={tmp_path}", "tracking.mlflow=true"])
    with pytest.raises(ConfigError, match=r"tracking\.mlflow: .*pip install 'probe-kd\[track\]'"):
        tracking.open_tracker(cfg)


def test_tracker_writes_params_step_metrics_and_artifacts_to_the_file_store(tmp_path):
    cfg = load(REPO / "configs/tiny.yaml", [f"out_dir={tmp_path / 'run'}", "tracking.mlflow=true", "tracking.run_name=t1"])
    (tmp_path / "run").mkdir()
    report = tmp_path / "run" / "report.md"
    report.write_text("# report\n")
    tracker = tracking.open_tracker(cfg)
    with tracking.recording(tracker, cfg, "run"):
        tracking.log_students(tracker, [StudentRecord(
            source="gold+probe", seed=0, test_acc=0.5, val_acc=0.6, best_epoch=2, train_label_acc=0.7, artifact="",
            history=[{"epoch": 1, "train_loss": 1.2, "val_acc": 0.4, "val_loss": 1.1, "seconds": 0.5},
                     {"epoch": 2, "train_loss": 0.9, "val_acc": 0.6, "val_loss": 1.0, "seconds": 0.4}])])
        tracking.log_timings(tracker, {"extract": 1.5, "probes": None})
        tracking.log_files(tracker, tmp_path / "run", tracking.REPORT_FILES)
    uri = (tmp_path / "run" / "mlruns").as_uri()
    [run] = _runs(uri)
    client = _client(uri)
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    assert run.data.params["config_hash"] == config_hash(cfg)
    assert run.data.params["student.epochs"] == "1" and run.data.params["tracking.mlflow"] == "true"
    assert run.data.params["extract.layers"] == "[1, 2, 3, 4]" and run.data.params["data.task"] == "null"
    assert _history(client, run.info.run_id, "gold_plus_probe/val_acc") == [(1, 0.4), (2, 0.6)]
    assert _history(client, run.info.run_id, "gold_plus_probe/train_loss") == [(1, 1.2), (2, 0.9)]
    assert run.data.metrics["gold_plus_probe/test_acc"] == 0.5 and run.data.metrics["seconds/extract"] == 1.5
    assert "seconds/probes" not in run.data.metrics  # a stage that did not run has no number
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.md"]


def test_a_failed_command_marks_its_run_failed(tmp_path):
    cfg = load(REPO / "configs/tiny.yaml", [f"out_dir={tmp_path}", "tracking.mlflow=true",
                                             f"tracking.uri={tmp_path / 'store'}", "tracking.experiment=other"])
    with pytest.raises(RuntimeError, match="boom"), tracking.recording(tracking.open_tracker(cfg), cfg, "train"):
        raise RuntimeError("boom")
    [run] = _runs(str(tmp_path / "store"), "other")
    assert run.info.status == "FAILED" and run.info.run_name == f"train {tmp_path}"
    assert run.data.tags["distill.command"] == "train"


def test_tracking_off_imports_no_mlflow_and_writes_no_mlruns(tmp_path):
    """The CLI with the default config, in a fresh interpreter, up to a bad-input failure inside `execute`."""
    out = tmp_path / "run"
    code = ("import sys; from cluster.cli import main; "
            f"rc = main(['run', 'configs/tiny.yaml', 'teacher.model=/nonexistent/model', 'out_dir={out}']); "
            "assert rc == 2, rc; assert 'mlflow' not in sys.modules, 'mlflow imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher.model: no model folder" in res.stderr
    assert out.is_dir() and not (out / "mlruns").exists()


def test_bench_results_and_files(tmp_path):
    """What `distill bench` records: each cell, each summary row's mean over seeds, the timings, the files."""
    cfg = load(REPO / "configs/bench.yaml", [f"out_dir={tmp_path}", "tracking.mlflow=true"])
    for name in ("bench.json", "bench.md", "bench_arc_easy.png", "bench_arc_easy_diff.png", "report.md"):
        (tmp_path / name).write_text("x")
    cell = {"dataset": "arc_easy", "regime": "head", "source": "gold+probe", "fraction": 0.1, "seed": 1,
            "test_acc": 0.5, "val_acc": 0.4, "best_epoch": 3, "train_label_acc": 0.9, "train_seconds": 2.0}
    results = {"cells": [cell], "dataset_seconds": {"arc_easy": {"total": 9.0, "extract": 4.0}}, "wall_seconds": 10.0,
               "summary": [{"dataset": "arc_easy", "regime": "head", "source": "gold", "fraction": 1.0, "mean": 0.6,
                            "lo": 0.5, "hi": 0.7}]}
    tracker = tracking.open_tracker(cfg)
    with tracking.recording(tracker, cfg, "bench"):
        tracking.log_bench(tracker, results, tmp_path)
    uri = (tmp_path / "mlruns").as_uri()
    [run] = _runs(uri)
    m = run.data.metrics
    assert m["arc_easy/head/gold_plus_probe/fraction_0.1/seed_1/test_acc"] == 0.5
    assert m["arc_easy/head/gold_plus_probe/fraction_0.1/seed_1/best_val_acc"] == 0.4
    assert m["arc_easy/head/gold/fraction_1/mean"] == 0.6 and m["arc_easy/head/gold/fraction_1/hi"] == 0.7
    assert m["seconds/arc_easy/extract"] == 4.0 and m["seconds/total"] == 10.0
    names = sorted(a.path for a in _client(uri).list_artifacts(run.info.run_id))
    assert names == ["bench.json", "bench.md", "bench_arc_easy.png", "bench_arc_easy_diff.png"]


def assert_tracked_run(out: Path, report: dict, stdout: str, run_name: str) -> None:
    """`distill run` with tracking.mlflow=true left one FINISHED run in <out>/mlruns holding the config, each
    label source's per-epoch curve, the stage summaries and timings, and report.json / report.md / the plot.
    (Called by the end-to-end test in tests/test_cli.py, whose run has tracking on.)"""
    uri = (out / "mlruns").as_uri()
    [run] = _runs(uri)
    client, rid = _client(uri), run.info.run_id
    assert f"MLflow run {rid}" in stdout
    assert run.info.status == "FINISHED" and run.info.run_name == run_name
    assert f"(config {run.data.params['config_hash']})" in stdout and run.data.params["tracking.mlflow"] == "true"
    assert run.data.params["report.config_hash"] == report["config_hash"]  # the config with `dtype: auto` resolved
    assert run.data.params["resolved.student.dtype"] == report["dtypes"]["student"]["dtype"]
    assert run.data.params["student.label_sources"] == json.dumps([s["source"] for s in report["students"]])
    for s in report["students"]:
        curve = _history(client, rid, f"{s['source']}/val_acc")
        assert [step for step, _ in curve] == list(range(1, s["epochs"] + 1))
        assert [v for _, v in curve] == pytest.approx(s["val_curve"])
        assert len(_history(client, rid, f"{s['source']}/train_loss")) == s["epochs"]
        assert run.data.metrics[f"{s['source']}/test_acc"] == pytest.approx(s["test_acc"])
        assert run.data.metrics[f"{s['source']}/best_epoch"] == s["best_epoch"]
    assert run.data.metrics["probe_sweep/test_acc"] == pytest.approx(report["probes"]["best"]["test_acc"])
    assert run.data.metrics["probe_sweep/oof_acc"] == pytest.approx(report["probes"]["oof_acc"])
    assert run.data.metrics["teacher/test_acc"] == pytest.approx(report["teacher_logit"]["test_acc"])
    assert {"seconds/extract", "seconds/probes", *(f"seconds/student_{s['source']}" for s in report["students"])} \
        <= set(run.data.metrics)
    names = sorted(a.path for a in client.list_artifacts(rid))
    assert names == ["probe_accuracy.png", "report.json", "report.md"]
    local = Path(client.download_artifacts(rid, "report.json", str(out.parent / "downloaded")))
    assert json.loads(local.read_text())["config_hash"] == report["config_hash"]
