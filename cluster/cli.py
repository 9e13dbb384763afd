"""`distill`: one CLI, a subcommand per stage and `run` for all.

    distill run configs/default.yaml [key=value ...]
    distill extract|probe|baseline|train|report CONFIG [key=value ...]
    distill bench CONFIG [key=value ...]     the matrix of `bench.*` (datasets x sources x fractions x seeds)
    distill show-config CONFIG [key=value ...]
    distill predict STUDENT_DIR questions.jsonl [--out predictions.jsonl]   a trained student's answers
    distill eval STUDENT_DIR [--split test] [--data FOLDER]                  a trained student's accuracy on a split
    distill verify OUT_DIR                   every store's checksums and every artifact's files, one line each
    distill tasks                            the built-in task specs (set data.task to one, or to your own YAML)

A stage runs the stages whose output it reads first when they have not run under the config (and says
so); `--no-prereqs` makes it refuse instead. Every stage that writes holds `<out_dir>/.distill.lock`
(one writer per run directory) and keeps a log file, `<out_dir>/logs/<time>-<command>-<pid>.log`.
`--quiet` keeps the console to warnings and errors; `--verbose` adds debug lines and the libraries' own
logs. A fault of the environment (disk full, memory, a vanished file, Ray failing to start, Ctrl-C) ends
with one line that says what happened, what was kept and the command to continue; `--verbose` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

from cluster import failures, runtime  # runtime sets Ray's environment before ray is imported
from engine import tracking
from engine.config import ConfigError, config_hash, dump_yaml, fields_help, load
from engine.lock import LockError, RunLock
from engine.log import WARNING, log, run_log, set_console
from engine.models import ModelError
from engine.store import StoreError
from engine.student_folder import StudentError
from engine.tasks import DataError

STAGES = ("extract", "probe", "baseline", "train", "report", "run")
KNOWN = (ConfigError, DataError, ModelError, StoreError, StudentError, LockError)  # bad input: exit 2, one line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Probe-based knowledge distillation on Ray.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="debug lines, the libraries' own logs (Ray, transformers, vLLM), and a failure's traceback")
    common.add_argument("--quiet", action="store_true",
                        help="warnings and errors only on the console (the run's log file under out_dir/logs keeps all)")
    sub = p.add_subparsers(dest="command", required=True)
    fields = fields_help()
    for name in (*STAGES, "bench", "show-config"):
        s = sub.add_parser(name, parents=[common], epilog=fields, formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("config", help="YAML config, e.g. configs/default.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. student.epochs=1")
        if name in ("probe", "baseline", "train", "report"):
            s.add_argument("--no-prereqs", action="store_true",
                           help="refuse, naming them, when the stages this one reads have not run under this config "
                                "(by default they run first, each announced)")
    sub.add_parser("tasks", parents=[common], help="list the built-in task specs (data.task)")
    s = sub.add_parser("verify", parents=[common], help="check every store and artifact under a run directory")
    s.add_argument("out_dir", help="a run's out_dir, e.g. runs/default")
    s = sub.add_parser("predict", parents=[common],
                       help="a trained student's per-choice probabilities and answer for each question")
    s.add_argument("student_dir", help="a student folder, e.g. runs/default/students/gold-<id>/model")
    s.add_argument("questions", help="a .jsonl/.json/.parquet file in the shared schema (answer optional)")
    s.add_argument("--out", help="where to write the predictions as JSON lines (default: <questions>.predictions.jsonl)")
    _student_run_args(s)
    s = sub.add_parser("eval", parents=[common], help="a trained student's accuracy on a split")
    s.add_argument("student_dir", help="a student folder, e.g. runs/default/students/gold-<id>/model")
    s.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="which of the run's splits (the same questions the run used; default test)")
    s.add_argument("--data", help="score every row of this file (shared schema, with answers) instead")
    _student_run_args(s)
    return p


def _student_run_args(s) -> None:
    """Where and how `predict` and `eval` run a student."""
    s.add_argument("--batch-size", type=int, default=16, help="questions per forward")
    s.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N', or 'auto' (default): a GPU when torch "
                                                    "sees one, else the CPU")
    s.add_argument("--dtype", default="trained", choices=("trained", "float32", "bfloat16"),
                   help="compute dtype: 'trained' (default) is the one it was trained and tested in (student.json), "
                        "which reproduces its reported accuracy; a bf16 student on a CPU without native bf16 runs "
                        "faster with float32")


def _student_device(args) -> tuple[str, str | None]:
    """(device, dtype or None for the student's own) from `--device` and `--dtype`; an unusable device is
    one clear error."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise StudentError(f"--device: {device!r} but torch sees no GPU here; use --device cpu (or auto)")
    elif device != "cpu" and not device.startswith("cuda"):
        raise StudentError(f"--device: {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device, None if args.dtype == "trained" else args.dtype


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
    device, dtype = _student_device(args)
    model, tok, info = load_student(args.student_dir)
    probs = predict_examples(model, tok, info, questions, batch_size=args.batch_size, device=device, dtype=dtype)
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

    device, dtype = _student_device(args)
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

    probs = predict_examples(model, tok, info, questions, batch_size=args.batch_size, device=device, dtype=dtype)
    answer = np.asarray([ex.answer for ex in questions])
    acc, lo, hi = bootstrap_accuracy(probs.argmax(1) == answer)
    print(f"[eval] {args.student_dir}: accuracy {accuracy(probs, answer):.4f} [95% CI {lo:.4f}, {hi:.4f}] on "
          f"{len(questions)} questions of {what}", flush=True)
    return 0


def tasks(args) -> int:
    """`distill tasks`: one line per built-in spec: name, where its rows live, how its answer is given."""
    from engine.taskspec import builtin_specs, load_spec

    for name in builtin_specs():
        spec = load_spec(name)
        where = spec.dataset_path or "(a local folder of yours)"
        if spec.dataset_name:
            where += f" [{spec.dataset_name}]"
        print(f"{name:<16} {where:<34} answer: {spec.answer_type:<5} roles: {'/'.join(spec.splits):<36} {spec.description}")
    print("[tasks] set data.task to a name above, or to the path of your own spec YAML (see README, 'Tasks')")
    return 0


def verify(args) -> int:
    """`distill verify`: one line per store and artifact; exit 1 if any is damaged."""
    from engine.verify import verify as check

    if not Path(args.out_dir).is_dir():
        raise StoreError(f"out_dir: {args.out_dir} is not a folder")
    verdicts = check(args.out_dir)
    for v in verdicts:
        print(f"{'ok ' if v.ok else 'BAD'}  {v.kind:<13} {v.path}: {v.detail}", flush=True)
    bad = sum(not v.ok for v in verdicts)
    print(f"[verify] {len(verdicts)} checked, {bad} damaged" + ("" if verdicts else f" (nothing under {args.out_dir})"))
    return 1 if bad else 0


def check_writable(path: str | Path, field: str) -> None:
    """Create `path` (a folder) and write a file in it, or raise ConfigError naming the field."""
    import os
    import uuid

    p = Path(path)
    probe = p / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to {p} ({err.strerror}); point {field} at a folder you can "
                          "write") from None


def execute(command: str, cfg, *, prereqs: bool = True, tracker=None) -> dict | None:
    """Run `command`. A stage whose inputs were not made yet under this config runs those stages first,
    saying so (`prereqs`), or refuses with one error naming them (`--no-prereqs`). `tracker`
    (`engine.tracking`; None records nothing) gets each stage's summaries, timings and report files."""
    from cluster import pipeline

    tracker = tracker or tracking.Tracker()
    if command == "bench":
        from cluster.bench import dataset_config, run_bench

        for dataset in cfg.bench.datasets:  # every dataset's data, model and store, before Ray starts
            pipeline.Run(dataset_config(cfg, dataset)).check_inputs()
        runtime.init(cfg.ray)
        try:
            results = run_bench(cfg)
            tracking.log_bench(tracker, results, cfg.out_dir)
            return results
        finally:
            runtime.shutdown()
    run = pipeline.Run(cfg)
    t0 = time.perf_counter()
    run.check_inputs()  # bad data, model or layers fail here, before Ray starts or anything is written
    lacking = pipeline.missing(run, pipeline.prerequisites(cfg, command))
    if lacking and not prereqs:
        raise ConfigError(f"{command}: needs the output of {', '.join(lacking)}, not made under this config in "
                          f"{cfg.out_dir} yet; run `distill {lacking[0]}` (or `distill run`) with this config first, "
                          "or drop --no-prereqs")
    if lacking:
        log("distill", f"{command}: not made yet under this config: {', '.join(lacking)}; running "
                       f"{'it' if len(lacking) == 1 else 'them'} first (--no-prereqs refuses instead)")
    runtime.init(cfg.ray)
    try:
        results = _stages(command, run, lacking, tracker)
    finally:
        runtime.shutdown()
    tracking.log_timings(tracker, run.timings)
    if results is not None:
        log("distill", f"{command} finished in {time.perf_counter() - t0:.0f}s; report in {cfg.out_dir}/report.md")
    return results


def _stages(command: str, run, lacking: list[str], tracker) -> dict | None:
    """The stages of `command` and those it reads that are `lacking`, in order; the report's results."""
    from cluster import pipeline

    cfg = run.cfg
    if command in ("extract", "run") or "extract" in lacking:
        pipeline.extract(run)
    if command == "extract":
        return None
    probes = None
    if command in ("probe", "run") or "probe" in pipeline.prerequisites(cfg, command):
        probes = pipeline.probe(run)  # the letter-mode brittleness table scores the probe
        tracking.log_probe(tracker, probes)
    if command in ("baseline", "report", "run"):
        base = pipeline.baseline(run, probes)
    if command in ("train", "report", "run"):
        students = pipeline.train(run, probes)
        tracking.log_students(tracker, students)
    if command in ("report", "run"):
        results = pipeline.report(run, probes, base, students)
        tracking.log_report(tracker, results, cfg.out_dir)
        return results
    return None


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # a polite stop (SIGTERM) ends like Ctrl-C: cleanly, resumable


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    set_console(quiet=args.quiet, verbose=args.verbose)
    again = "distill " + shlex.join(sys.argv[1:] if argv is None else argv)
    out_dir = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        if args.command == "predict":
            return predict(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "verify":
            return verify(args)
        if args.command == "tasks":
            return tasks(args)
        cfg = load(args.config, args.overrides)
        if args.command == "show-config":  # YAML that loads back as the same config
            made = "distill show-config " + shlex.join([args.config, *args.overrides])
            print(dump_yaml(cfg, f"{made}\nconfig hash {config_hash(cfg)}"), end="")
            return 0
        tracker = tracking.open_tracker(cfg)  # tracking.mlflow without mlflow installed fails here, writing nothing
        if not cfg.ray.address:
            check_writable(cfg.ray.temp_dir, "ray.temp_dir")
        check_writable(cfg.out_dir, "out_dir")
        with RunLock(cfg.out_dir, again) as lock, run_log(cfg.out_dir, args.command, quiet=args.quiet) as log_file:
            out_dir = cfg.out_dir
            if lock.took_over:
                log("distill", f"took over {lock.path}: its holder (pid {lock.took_over.get('pid')}, "
                               f"{lock.took_over.get('command')!r}) died without releasing it", WARNING)
            log("distill", f"{args.command} {args.config} (config {config_hash(cfg)}) -> {cfg.out_dir}; log {log_file}")
            with tracking.recording(tracker, cfg, args.command):  # one MLflow run per command when tracking.mlflow
                execute(args.command, cfg, prereqs=not getattr(args, "no_prereqs", False), tracker=tracker)
    except KeyboardInterrupt:
        _say("interrupted", out_dir, again, args.verbose)
        return 130
    except Exception as err:  # noqa: BLE001 - bad input or a fault of the environment: one line; a bug: traceback
        known = next((e for e in failures.causes(err) if isinstance(e, KNOWN) and getattr(e, "cause", None) is None),
                     None)  # bad input raised inside a Ray task arrives wrapped in a RayTaskError
        if known is not None:
            print(f"distill: error: {known}", file=sys.stderr)
            if args.verbose:
                traceback.print_exc()
            return 2
        line = failures.describe(err)
        if line is None:
            raise
        _say(line, out_dir, again, args.verbose)
        return 1
    return 0


def _say(what: str, out_dir: str | None, again: str, verbose: bool) -> None:
    """What happened, what was kept, the command to continue: one line (and the traceback if asked)."""
    from engine.verify import kept

    msg = f"distill: {what}."
    if out_dir:
        msg += f" Kept: {kept(out_dir)}. To continue: {again}"
    print(msg, file=sys.stderr, flush=True)
    if verbose:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
