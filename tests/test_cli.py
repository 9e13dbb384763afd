"""The `distill` CLI: bad input fails early with one clear error and writes nothing; the tiny config
runs end to end through local Ray, Zarr, vLLM and Ray Train, all real."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import distill

from cluster.cli import main
from engine import store
from tests.test_tracking import assert_tracked_run


def _copy_split_files(shared_data: Path, dest: Path, n: int = 30) -> Path:
    dest.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = (shared_data / "arc_easy" / f"{split}.jsonl").read_text().splitlines()[:n]
        (dest / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def _assert_nothing_written(out: Path) -> None:
    assert not (out / "activations.zarr").exists()
    assert not (out / "activations.zarr.partial").exists()


def _fails(capsys, argv: list[str], pattern: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("distill: error:") == 1, err


    assert re.search(pattern, err), err
    return err


def test_paths_in_a_read_only_directory(tmp_path, tiny_model, capsys):
    """/sys is read-only for everyone, root included (a chmod would not stop root)."""
    args = ["extract", "configs/tiny.yaml", f"teacher.model={tiny_model}"]
    _fails(capsys, [*args, "out_dir=/sys/probe-kd-test"],
           r"out_dir: cannot write to /sys/probe-kd-test \(.+\); point out_dir at a folder you can write")
    out = tmp_path / "run"
    _fails(capsys, [*args, f"out_dir={out}", "ray.temp_dir=/sys/probe-kd-ray"],
           r"ray\.temp_dir: cannot write to /sys/probe-kd-ray")
    assert not out.exists()


def test_malformed_row(tmp_path, shared_data, tiny_model, capsys):
    data = _copy_split_files(shared_data, tmp_path / "data")
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-5]  # cut the closing of the JSON object
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    _fails(capsys, ["run", "configs/tiny.yaml", f"data.source={data}", f"teacher.model={tiny_model}", f"out_dir={out}"],
           r"train\.jsonl:5: not valid JSON")
    _assert_nothing_written(out)


def test_answer_out_of_range(tmp_path, shared_data, tiny_model, capsys):
    data = _copy_split_files(shared_data, tmp_path / "data")
    lines = (data / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = len(row["choices"])
    lines[2] = json.dumps(row)
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    _fails(capsys, ["extract", "configs/tiny.yaml", f"data.source={data}", f"teacher.model={tiny_model}", f"out_dir={out}"],
           r"test\.jsonl:3: field 'answer': \d is out of range")
    _assert_nothing_written(out)


def test_unknown_config_key(tmp_path, capsys):
    _fails(capsys, ["run", "configs/tiny.yaml", "student.epoch=2", f"out_dir={tmp_path}"],
           r"student\.epoch: unknown key\. Valid keys here: .*epochs")
    _assert_nothing_written(tmp_path)


def test_missing_model_path(tmp_path, capsys):
    _fails(capsys, ["run", "configs/tiny.yaml", "teacher.model=/nonexistent/model", f"out_dir={tmp_path}"],
           r"teacher\.model: no model folder at '/nonexistent/model'")
    _assert_nothing_written(tmp_path)


def test_layers_beyond_the_teacher(tmp_path, tiny_model, capsys):
    _fails(capsys, ["extract", "configs/tiny.yaml", "extract.layers=[2, 9]", f"teacher.model={tiny_model}", f"out_dir={tmp_path}"],
           r"extract\.layers: \[9\] exceed the teacher's 4 layers")
    _assert_nothing_written(tmp_path)


def test_combine_layers_beyond_the_store(tmp_path, tiny_model, capsys):
    _fails(capsys, ["run", "configs/tiny.yaml", "extract.layers=[2, 3]", "probe.combine_layers=3", f"teacher.model={tiny_model}",
                    f"out_dir={tmp_path}"], r"probe\.combine_layers: 3 exceeds the 2 stored layers")
    _assert_nothing_written(tmp_path)


def test_student_without_weights_or_with_a_foreign_tokenizer(tmp_path, tiny_model, tiny_bert, capsys):
    """A student folder with no safetensors, or whose tokenizer does not fit its model, is refused before
    Ray starts, naming student.model; nothing is written."""
    from tests.test_student import with_tokenizer_of

    bare = tmp_path / "bare"
    shutil.copytree(tiny_bert, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "run"
    _fails(capsys, ["run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"student.model={bare}", f"out_dir={out}"],
           r"student\.model: .*bare has no \*\.safetensors weights")
    _assert_nothing_written(out)
    foreign = with_tokenizer_of(tiny_model, tiny_bert, tmp_path / "foreign")
    _fails(capsys, ["run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"student.model={foreign}", f"out_dir={out}"],
           r"student\.model: the tokenizer in .*foreign' has 1024 tokens but the model embeds only \d+")
    _assert_nothing_written(out)


def tiny_test_examples():
    from engine.config import load
    from engine.tasks import load_role

    return load_role(load("configs/tiny.yaml").data, "test")


def write_questions(path, examples, drop_answer: bool = False):
    with open(path, "w") as f:
        for e in examples:
            row = {"id": e.id, "question": e.question, "choices": list(e.choices), "answer": e.answer}
            if drop_answer:
                row.pop("answer")
            f.write(json.dumps(row) + "\n")


@pytest.mark.slow
def test_a_student_with_its_own_vocabulary_end_to_end(tmp_path, tiny_model, tiny_bert):
    """A BERT-style student whose tokenizer is not the teacher's trains through `distill run`, reads its own
    tokens, and predicts from its folder in a fresh process what the run reported. The run is tracked
    (`tracking.mlflow=true`): its MLflow run holds the config, both students' epoch curves and the report."""
    out = tmp_path / "run"
    res = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"student.model={tiny_bert}",
                  f"out_dir={out}", "student.label_sources=[gold, probe]", "student.epochs=2", "baseline.enabled=false",
                  "student.num_layers=null", "student.lr=1e-3", "tracking.mlflow=true", "tracking.run_name=bert")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert_tracked_run(out, report, res.stdout, "bert")  # one MLflow run in <out>/mlruns (tests/test_tracking.py)
    assert [s["source"] for s in report["students"]] == ["gold", "probe"]
    for s in report["students"]:
        info = json.loads((Path(s["model_dir"]) / "student.json").read_text())
        assert info["input"]["kind"] == "encoder" and info["pooling"] == "mean" and len(info["history"]) == 2
        assert info["best_epoch"] == s["best_epoch"] and s["test_ci"][0] <= s["test_acc"] <= s["test_ci"][1]
    [pair] = report["student_pairs"]
    assert (pair["a"], pair["b"]) == ("probe", "gold") and pair["lo"] <= pair["diff"] <= pair["hi"]
    questions = tmp_path / "q.jsonl"
    write_questions(questions, tiny_test_examples(), drop_answer=True)
    for s in report["students"]:
        dest = tmp_path / f"{s['source']}.jsonl"
        pred = distill("predict", s["model_dir"], str(questions), "--out", str(dest))
        assert pred.returncode == 0, pred.stderr[-3000:]
        rows = [json.loads(x) for x in dest.read_text().splitlines()]
        answers = [e.answer for e in tiny_test_examples()]
        assert "correct" not in rows[0]  # no answers were given
        assert np.mean([r["prediction"] == a for r, a in zip(rows, answers, strict=True)]) == pytest.approx(s["test_acc"])


def test_predict_refuses_bad_input_and_writes_nothing(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    from engine import student as st
    from engine import student_folder as sf
    from engine.config import from_dict

    model = st.build_student(str(tiny_bert), from_dict({"student": {"model": str(tiny_bert)}}).student, max_choices=4)
    folder = sf.save_student(tmp_path / "s", model, AutoTokenizer.from_pretrained(tiny_bert),
                             st.InputSpec("encoder", "per_choice", 32), {"source": "gold"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "Q?", "options": ["x", "y"]}) + "\n")
    res = distill("predict", str(folder), str(bad))
    assert res.returncode == 2 and "field 'choices': missing" in res.stderr and "Traceback" not in res.stderr
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "a", "question": "Q?", "choices": ["x"]}) + "\n")
    res = distill("predict", str(folder), str(one))
    assert res.returncode == 2 and "has 1 choice(s)" in res.stderr
    zero = tmp_path / "zero.jsonl"
    zero.write_text(json.dumps({"id": "a", "question": "Q?", "choices": []}) + "\n")
    assert "has 0 choice(s)" in distill("predict", str(folder), str(zero)).stderr
    (folder / "model.safetensors").unlink()
    good = tmp_path / "good.jsonl"
    write_questions(good, tiny_test_examples()[:2])
    # A GPU asked for where there is none: one error naming --device, before anything is read.
    res = distill("predict", str(folder), str(good), "--device", "cuda", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2 and "--device: 'cuda' but torch sees no GPU here" in res.stderr
    res = distill("predict", str(folder), str(good))
    assert res.returncode == 2 and "weights are missing" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "one.jsonl", "s", "zero.jsonl"]


@pytest.mark.slow
def test_tiny_config_end_to_end(tmp_path, tiny_model):
    out = tmp_path / "run"
    # A stage asked not to run what it reads refuses, naming those stages, and writes nothing.
    refused = distill("train", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "--no-prereqs")
    assert refused.returncode == 2 and refused.stderr.count("distill: error:") == 1, refused.stderr[-3000:]
    assert "train: needs the output of extract, probe, not made under this config" in refused.stderr
    assert not (out / "activations.zarr").exists() and not list(out.glob("probes-*"))
    res = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("[extract] committed", "[probes] best on validation", "[baseline] vLLM teacher accuracy",
                  "[train] student[probe] test accuracy", "[report] wrote"):
        assert stage in res.stdout, stage
    # The Ray Train worker's progress lines reach the driver once each, without the State API noise of
    # a dashboard-less local Ray.
    logged = res.stdout + res.stderr
    epochs = re.findall(r"\[student-\w+\] job \d+/\d+ epoch \d+/\d+ loss [^\n]*", logged)
    assert len(epochs) == 3 and len(set(epochs)) == 3, epochs  # 3 students x 1 epoch, each line once
    assert "State API may be temporarily unavailable" not in logged
    assert "Reporting training result" not in logged  # Ray Train's per-report INFO line: only with --verbose

    report = json.loads((out / "report.json").read_text())
    assert [s["source"] for s in report["students"]] == ["gold", "logit", "probe"]
    assert all(0.0 <= s["test_acc"] <= 1.0 for s in report["students"])
    assert report["labels"]["gold"]["train_label_acc"] == 1.0
    assert [p["layer"] for p in report["probes"]["per_layer"]] == [1, 2, 3, 4]
    assert set(report["probes"]["best"]["layers"]) <= {1, 2, 3, 4}
    single = [r for r in report["probes"]["sweep"] if not r["combine"]]
    assert {(r["family"], r["layer"]) for r in single} == {
        (f, la) for f in ("logreg", "conditional_logit") for la in (1, 2, 3, 4)}  # configs/tiny.yaml sweeps both
    combined = [r for r in report["probes"]["sweep"] if r["combine"]]  # and two-layer concat / ensemble candidates
    assert sorted(r["combine"] for r in combined) == ["concat", "ensemble"]
    assert all(r["layer"] is None and len(r["layers"]) == 2 for r in combined)
    assert report["splits"] == {"train": 40, "validation": 20, "test": 24, "train_used": 40}
    assert report["vllm_baseline"]["n_questions"] == 8
    assert report["vllm_baseline"]["max_abs_diff_vs_transformers"] < 1e-3  # fp32 vLLM == fp32 transformers
    assert (out / "report.md").read_text().startswith("# Probe-KD report")
    assert (out / "probe_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "mlruns").exists()  # tracking is off by default

    root = zarr.open_group(str(out / "activations.zarr"), mode="r")
    assert root.attrs["complete"] and root.attrs["config_hash"] == report["config_hash"]
    assert root.attrs["identity"]["extract.layers"] == [1, 2, 3, 4]
    acts = root["test"]["activations"]
    assert acts.dtype == "float16" and acts.shape[1:] == (4, 128)
    assert acts.chunks[0] == store.chunk_size(acts.shape[0], 32) <= 32  # balanced: 97 rows -> 4 chunks of 25
    assert root["test"]["done"][:].all()
    assert not (out / "activations.zarr.partial").exists()

    # `distill verify` reads every chunk and every artifact file back against its checksum.
    ver = distill("verify", str(out))
    assert ver.returncode == 0, ver.stdout[-3000:]
    checked = re.findall(r"^ok +(store|artifact) ", ver.stdout, re.M)
    assert checked.count("store") == 1 and checked.count("artifact") >= 5, ver.stdout  # probes, baseline, 3 students

    # A second run reuses every artifact; a run whose store would differ is refused, naming the field.
    # The run kept a log file: its progress records and the workers' lines Ray printed in the driver.
    (run_log,) = (out / "logs").glob("*-run-*.log")
    text = run_log.read_text()
    assert "INFO [extract] committed" in text and re.search(r"\[student-gold\] job \d+/\d+ epoch 1/1 loss", text)
    # --quiet: nothing but warnings on the console, all of it in the second run's own log file.
    again = distill("report", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "--no-prereqs",
                    "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[probe] reusing" not in again.stdout and "[distill]" not in again.stdout, again.stdout[-3000:]
    (report_log,) = (out / "logs").glob("*-report-*.log")
    logged = report_log.read_text()
    assert "not made yet" not in logged
    assert "[probe] reusing" in logged and "[train] reusing" in logged and "[distill] report finished" in logged
    assert json.loads((out / "report.json").read_text())["students"] == report["students"]
    refused = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "extract.layers=[1, 2]")
    assert refused.returncode == 2
    assert "extract.layers: store has [1, 2, 3, 4], config has [1, 2]" in refused.stderr

    # Every student is a model folder: in a fresh process `distill eval` and `distill predict` reproduce its
    # reported test accuracy from the folder alone.
    gold = next(s for s in report["students"] if s["source"] == "gold")
    ev = distill("eval", gold["model_dir"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"accuracy {gold['test_acc']:.4f}" in ev.stdout and "on 24 questions" in ev.stdout
    ev32 = distill("eval", gold["model_dir"], "--device", "cpu", "--dtype", "float32")  # another dtype: it runs
    assert ev32.returncode == 0 and "on 24 questions" in ev32.stdout, ev32.stderr[-3000:]
    questions = tmp_path / "test_questions.jsonl"
    write_questions(questions, tiny_test_examples())
    pred = distill("predict", gold["model_dir"], str(questions), "--out", str(tmp_path / "pred.jsonl"))
    assert pred.returncode == 0, pred.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(abs(sum(r["probs"]) - 1) < 1e-4 for r in rows)
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(gold["test_acc"])
    shutil.rmtree(out / "ray_train", ignore_errors=True)
