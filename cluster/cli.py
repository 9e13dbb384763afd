"""`distill`: one CLI, a subcommand per stage and `run` for all.

    distill run configs/default.yaml [key=value ...]
    distill extract|probe|baseline|train|report CONFIG [key=value ...]
    distill bench CONFIG [key=value ...]     the matrix of `bench.*` (datasets x sources x fractions x seeds)
    distill show-config CONFIG [key=value ...]
    distill predict STUDENT_DIR questions.jsonl [--out predictions.jsonl]   a trained student's answers
    distill eval STUDENT_DIR [--split test] [--data FOLDER]                  a trained student's accuracy on a split
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster import runtime  # sets Ray's environment before ray is imported
from engine.config import ConfigError, config_hash, load, to_dict
from engine.models import ModelError
from engine.store import StoreError
from engine.student_folder import StudentError
from engine.tasks import DataError

STAGES = ("extract", "probe", "baseline", "train", "report", "run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Probe-based knowledge distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*STAGES, "bench", "show-config"):
        s = sub.add_parser(name)
        s.add_argument("config", help="YAML config, e.g. configs/default.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. student.epochs=1")
    s = sub.add_parser("predict", help="a trained student's per-choice probabilities and answer for each question")
    s.add_argument("student_dir", help="a student folder, e.g. runs/default/students/gold-<id>/model")
    s.add_argument("questions", help="a .jsonl/.json/.parquet file in the shared schema (answer optional)")
    s.add_argument("--out", help="where to write the predictions as JSON lines (default: <questions>.predictions.jsonl)")
    s.add_argument("--batch-size", type=int, default=16, help="questions per forward")
    s = sub.add_parser("eval", help="a trained student's accuracy on a split")
    s.add_argument("student_dir", help="a student folder, e.g. runs/default/students/gold-<id>/model")
    s.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="which of the run's splits (the same questions the run used; default test)")
    s.add_argument("--data", help="score every row of this file (shared schema, with answers) instead")
    s.add_argument("--batch-size", type=int, default=16, help="questions per forward")
    return p


def predict(args) -> int:
    """`distill predict`: one JSON line per question, written atomically; refuses to overwrite."""
    import os
    from pathlib import Path

    import numpy as np

    from engine.student_folder import load_student, predict_examples
    from engine.tasks import read_questions

    questions = read_questions(args.questions)
    src = Path(args.questions)
    out = Path(args.out) if args.out else src.with_name(src.stem + ".predictions.jsonl")
    if out.exists():
        raise StudentError(f"--out: {out} exists; refusing to overwrite it. Pass another --out or delete it")
    model, tok, info = load_student(args.student_dir)
    probs = predict_examples(model, tok, info, questions, batch_size=args.batch_size)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for ex, p in zip(questions, probs, strict=True):
            row = {"id": ex.id, "probs": [round(float(x), 6) for x in p[: len(ex.choices)]],
                   "prediction": int(np.argmax(p[: len(ex.choices)]))}
            if ex.answer >= 0:
                row |= {"answer": ex.answer, "correct": row["prediction"] == ex.answer}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    known = [ex.answer for ex in questions if ex.answer >= 0]
    msg = f"[predict] {len(questions)} questions -> {out}"
    if known:
        hits = sum(int(np.argmax(p[: len(ex.choices)]) == ex.answer) for ex, p in zip(questions, probs, strict=True)
                   if ex.answer >= 0)
        msg += f"; accuracy {hits / len(known):.4f} on the {len(known)} with an answer"
    print(msg, flush=True)
    return 0


def evaluate(args) -> int:
    """`distill eval`: accuracy of a student on its run's split (or on a file)."""
    from engine.config import DataConfig, _build
    from engine.metrics import accuracy, bootstrap_accuracy
    from engine.student_folder import load_student, predict_examples
    from engine.tasks import load_role, read_questions

    model, tok, info = load_student(args.student_dir)
    if args.data:
        questions, what = read_questions(args.data), args.data
        if any(ex.answer < 0 for ex in questions):
            raise DataError(f"{args.data}: every row needs an 'answer' to be scored; use `distill predict` otherwise")
    else:
        if "config" not in info:
            raise StudentError(f"{args.student_dir}: student.json records no run config; pass --data FILE")
        data = _build(DataConfig, info["config"]["data"], "data.")
        questions, what = load_role(data, args.split), f"{data.dataset} {args.split} ({data.source})"
    import numpy as np

    probs = predict_examples(model, tok, info, questions, batch_size=args.batch_size)
    answer = np.asarray([ex.answer for ex in questions])
    acc, lo, hi = bootstrap_accuracy(probs.argmax(1) == answer)
    print(f"[eval] {args.student_dir}: accuracy {accuracy(probs, answer):.4f} [95% CI {lo:.4f}, {hi:.4f}] on "
          f"{len(questions)} questions of {what}", flush=True)
    return 0


def execute(command: str, cfg) -> dict | None:
    from cluster import pipeline

    if command == "bench":
        from cluster.bench import dataset_config, run_bench

        for dataset in cfg.bench.datasets:  # every dataset's data, model and store, before Ray starts
            pipeline.Run(dataset_config(cfg, dataset)).check_inputs()
        runtime.init(cfg.ray)
        try:
            return run_bench(cfg)
        finally:
            runtime.shutdown()
    run = pipeline.Run(cfg)
    t0 = time.perf_counter()
    run.check_inputs()  # bad data, model or layers fail here, before Ray starts or anything is written
    runtime.init(cfg.ray)
    try:
        if command in ("extract", "run"):
            pipeline.extract(run)
        if command == "extract":
            return None
        probe_meta = None
        letter_table = cfg.prompt.mode == "letter" and cfg.baseline.enabled and bool(cfg.baseline.formats)
        if command in ("probe", "train", "report", "run") or (command == "baseline" and letter_table):
            probe_meta, probe_arrays = pipeline.probe(run)  # the letter-mode brittleness table scores the probe
        if command in ("baseline", "report", "run"):
            base = pipeline.baseline(run, probe_meta)
        if command in ("train", "report", "run"):
            students = pipeline.train(run, probe_arrays)
        if command in ("report", "run"):
            results = pipeline.report(run, probe_meta, base, students)
            print(f"[distill] {command} finished in {time.perf_counter() - t0:.0f}s; report in {cfg.out_dir}/report.md")
            return results
        return None
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            return predict(args)
        if args.command == "eval":
            return evaluate(args)
        cfg = load(args.config, args.overrides)
        if args.command == "show-config":
            print(json.dumps({"config_hash": config_hash(cfg), **to_dict(cfg)}, indent=2))
            return 0
        print(f"[distill] {args.command} {args.config} (config {config_hash(cfg)}) -> {cfg.out_dir}", flush=True)
        execute(args.command, cfg)
    except (ConfigError, DataError, ModelError, StoreError, StudentError) as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
