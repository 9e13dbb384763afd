"""Student epoch wall time: Ray Train (TorchTrainer, one worker) against a plain torch loop, same data.

    .venv/bin/python bench/student.py          # prints, writes bench/results/student.json

Both train the default's student (all-MiniLM-L6-v2, fully fine-tuned, reading (question, choice) pairs
with its own tokenizer) for `--epochs` epochs on the same ARC-Easy train questions with gold labels, the
same batches, optimiser, schedule and threads; both score validation after every epoch, keep the best
epoch, score the test questions with it and save the student folder:
  plain:  `engine.fit` in this process (the loop Ray Train's workers run, as rank 0 of 1): build the
          model, `fit_job` (training and validation per epoch), `finish_job`, `save_student`;
  ray:    `cluster.train.train_student` (1 worker, `cpus` CPUs): the whole `TorchTrainer.fit()`,
          including worker start-up, checkpointing and the test prediction, timed from the driver.
The two alternate `--repeats` times (the epoch time on a shared machine drifts between runs) and the
medians are compared, three ways:
  epoch:      an epoch under Ray Train, training, validation and its checkpoint (the time the checkpoint
              held the loop up; Ray copies it to storage in the background), against a plain epoch
              (training and validation). Taken over the epochs but the last, whose checkpoint hold is
              not recorded. This is the target (<= 1.15).
  train only: the training part of the epochs alone (Ray) against a whole plain epoch.
  whole call: the whole fit() against the whole plain run: adds the per-run start-up (worker process,
              imports, process group), paid once per run and shared by every student of a stage.
Ray's own start-up (`ray.init`) is timed apart. For each side it also records where the training's
wall time went, per epoch: the process's CPU seconds in user and kernel mode and its page faults
(`engine.fit.cpu_spent`), and compares the user CPU (the work itself) apart from the wall time.

On a VM guest that hands freed memory back to its host (free page reporting: `bench/memory_state.py`),
a new process's memory costs 0.2 s per GiB where a process freed it a second earlier and 3-7 s where it
has been free for a few seconds, so the first epoch of each side depends on what ran before it and
when. Run back to back, the side that ran second could start on memory the first had just freed.
`--settle` (10 s by default) waits before each side, so that neither does; `--settle 0` is the earlier
protocol. The machine's reporting state is recorded with the figures, and `ratio_train_by_epoch` gives
the training's ratio epoch by epoch (the first carries each process's first touch of its memory).

The plain loop runs in a new process each repeat (`--plain-in fresh`, the default; spawned, its
start-up and imports not timed), as a Ray Train worker does every `fit()` and as a user's own script
would. `--plain-in driver` runs it in this process instead, as this bench did before: there the Ray
side's epochs scattered widely after the plain run (on a 2-core Xeon VM, 13.4-28 s against 12.3-12.8 s
when the plain run had its own process), so the ratio read anywhere from 0.81 to 1.72 on the same code
(`bench/results/student_xeon/`).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import numpy as np  # noqa: E402

from cluster import runtime  # noqa: E402  (sets Ray's environment before ray is imported)
from engine import fit, labels  # noqa: E402
from engine import student as st  # noqa: E402
from engine import student_folder as sf  # noqa: E402
from engine.config import load  # noqa: E402
from engine.hardware import free_page_reporting, matmul_flags, pick_dtype  # noqa: E402
from engine.models import resolve_model  # noqa: E402
from engine.tasks import load_role  # noqa: E402

OUT = Path(__file__).parent / "results" / "student.json"


def plain(cfg, model_path: str, splits: dict, spec, job, pad_id: int, out_dir: str) -> dict:
    """The same student, batches, optimiser, schedule, validation and test scoring in this process:
    `engine.fit`, which Ray Train's worker loop runs too, as rank 0 of 1."""
    import torch

    s = cfg.student
    worker = fit.Worker(dtype=pick_dtype(s.dtype, gpu=False)[0])
    t0 = time.perf_counter()
    torch.set_num_threads(s.cpus_per_worker)
    torch.manual_seed(job.seed)
    tok, _ = st.student_inputs(s, model_path, spec.answer_format)
    max_choices = max(x.max_choices for x in splits.values())
    model = st.build_student(model_path, s, max_choices=max_choices, answer_format=spec.answer_format, tokenizer=tok)
    names = st.set_trainable(model, s.finetune, s.top_blocks)
    optimizer = st.make_optimizer(model, s.train_lr, s.weight_decay)
    steps = fit.steps_per_epoch(len(job.questions), 1, s.train_batch_size)
    scheduler = st.make_scheduler(optimizer, steps * s.train_epochs, start_step=0)
    triple = fit.job_targets(job.questions, job.targets, job.answers, splits["train"], max_choices)
    progress = fit.fit_job(model, names, splits, triple, scfg=s, seed=job.seed,
                           alpha=labels.loss_alpha(job.source, s.alpha, s.mix_alpha), epochs=s.train_epochs,
                           pad_id=pad_id, optimizer=optimizer, scheduler=scheduler, worker=worker,
                           progress=fit.JobProgress())
    done = fit.finish_job(model, names, splits, progress, scfg=s, pad_id=pad_id, worker=worker)
    sf.save_student(Path(out_dir) / "plain-student", model, tok, spec, {"source": job.source})
    epochs = [h["seconds"] + h["val_seconds"] for h in progress.history]
    timed = epochs[:-1] or epochs  # the epochs compared with Ray's (all but the last)
    return {"wall_seconds": round(time.perf_counter() - t0, 2), "epoch_seconds": round(float(np.mean(timed)), 2),
            "epochs": [round(e, 2) for e in epochs], "cpu": cpu_columns(progress.history),
            "train_loss": progress.history[-1]["train_loss"],
            "best_epoch": done.best_epoch, "test_acc": done.metrics(splits)["test_acc"]}


CPU_KEYS = ("seconds", "cpu_user_seconds", "cpu_system_seconds", "page_faults", "peak_rss_mib")


def cpu_columns(history: list[dict]) -> dict:
    """Per epoch, the training part's wall seconds, CPU seconds (user, kernel), page faults and the
    process's peak resident memory so far."""
    return {k: [h[k] for h in history] for k in CPU_KEYS}


def cpu_summary(runs: list[dict], timed: int) -> dict:
    """Medians over the repeats of the timed epochs' means: where an epoch's wall time went."""
    return {k: float(np.median([np.mean(r["cpu"][k][:timed]) for r in runs])) for k in CPU_KEYS}


def ray_first(order: str, repeat: int) -> bool:
    """Whether Ray Train runs first in repeat `repeat` (0-based)."""
    return order == "ray-first" or (order == "alternate" and repeat % 2 == 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--train-questions", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=3, help=">= 2: the last epoch's checkpoint hold is not recorded")
    ap.add_argument("--test-questions", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--order", choices=("alternate", "plain-first", "ray-first"), default="alternate",
                    help="which side runs first in each repeat (alternate: plain first in odd repeats)")
    ap.add_argument("--plain-in", choices=("fresh", "driver"), default="fresh",
                    help="run the plain loop in this process (driver) or in a new one per repeat (fresh)")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds to wait before each side, so that both start from the same memory state (0: none)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = load(args.config, [f"student.epochs={args.epochs}", "student.num_workers=1", "student.label_sources=[gold]",
                           "student.finetune=full", "student.lr=3e-5"])  # the whole student at the lr of every reading in bench/results
    model_path = st.resolve_student_path(cfg.student, resolve_model(cfg.teacher))
    tok, spec = st.student_inputs(cfg.student, model_path, cfg.prompt.answer_format)
    examples = {"train": load_role(cfg.data, "train")[: args.train_questions],
                "validation": load_role(cfg.data, "validation"),
                "test": load_role(cfg.data, "test")[: args.test_questions]}
    splits = {r: st.encode_examples(ex, tok, spec) for r, ex in examples.items()}
    train, test = splits["train"], splits["test"]
    targets = labels.gold_targets(train.answer, train.n_choices)

    from cluster.train import StudentJob, train_student

    job = StudentJob("gold", cfg.seed, np.arange(train.n_questions), targets, train.answer)

    t0 = time.perf_counter()
    runtime.init(cfg.ray)
    ray_init_s = time.perf_counter() - t0
    plains, rays = [], []
    try:
        for i in range(args.repeats):  # alternate, so drift on the machine hits both sides alike
            storage = tempfile.mkdtemp(prefix="bench-student-")
            try:
                plain_args = (cfg, model_path, splits, spec, job, tok.pad_token_id, storage)

                def run_plain(plain_args=plain_args):
                    time.sleep(args.settle)
                    if args.plain_in == "fresh":
                        import multiprocessing as mp

                        with mp.get_context("spawn").Pool(1) as pool:
                            return pool.apply(plain, plain_args)
                    return plain(*plain_args)

                def run_ray(storage=storage):
                    time.sleep(args.settle)
                    return train_student(cfg.student, job, model_path=model_path, splits=splits, spec=spec,
                                         pad_id=tok.pad_token_id, storage_dir=storage)

                if ray_first(args.order, i):
                    r = run_ray()
                    plains.append(run_plain())
                else:
                    plains.append(run_plain())
                    r = run_ray()
            finally:
                shutil.rmtree(storage, ignore_errors=True)
            timed = max(1, args.epochs - 1)
            train_s = [h["seconds"] for h in r["history"]][:timed]
            val_s = [h["val_seconds"] for h in r["history"]][:timed]
            held = r["report_seconds"][:timed]
            rays.append({"wall_seconds": round(r["wall_seconds"], 2),
                         "epoch_seconds": round(float(np.mean(train_s) + np.mean(val_s) + np.mean(held or [0.0])), 2),
                         "train_seconds": round(float(np.mean(train_s) + np.mean(val_s)), 2),
                         "checkpoint_hold_seconds": [round(x, 2) for x in held],
                         "epochs": [round(h["seconds"], 2) for h in r["history"]], "cpu": cpu_columns(r["history"]),
                         "test_acc": r["test_accuracy"]})
            print(f"[{i + 1}/{args.repeats}] plain {plains[-1]['wall_seconds']} s (epoch {plains[-1]['epoch_seconds']} s), "
                  f"ray {rays[-1]['wall_seconds']} s (epoch {rays[-1]['epoch_seconds']} s)", flush=True)
    finally:
        runtime.shutdown()

    def med(runs, key):
        return round(float(np.median([r[key] for r in runs])), 2)

    keys = ("wall_seconds", "epoch_seconds", "train_seconds")
    p = {**{k: med(plains, k) for k in keys if k != "train_seconds"}, "runs": plains}
    p["train_seconds"] = p["epoch_seconds"]
    ray = {**{k: med(rays, k) for k in keys}, "runs": rays, "ray_init_seconds": round(ray_init_s, 2)}
    results = {
        "command": " ".join(["python", "bench/student.py", *sys.argv[1:]]), "config": args.config,
        "train_questions": train.n_questions, "test_questions": test.n_questions, "rows": train.n_rows,
        "validation_questions": splits["validation"].n_questions,
        "student": {"model": cfg.student.model, "finetune": cfg.student.finetune, "batch_size": cfg.student.batch_size,
                    "dtype": pick_dtype(cfg.student.dtype, gpu=False)[0],
                    "epochs": args.epochs, "cpus_per_worker": cfg.student.cpus_per_worker, "mode": cfg.student.mode},
        "plain_in": args.plain_in, "order": args.order, "settle_seconds": args.settle,
        "ray_first": [ray_first(args.order, i) for i in range(args.repeats)], "plain": p, "ray_train": ray,
        "ratio_epoch": round(ray["epoch_seconds"] / p["epoch_seconds"], 3),
        "ratio_train_only": round(ray["train_seconds"] / p["train_seconds"], 3),
        "ratio_whole_call": round(ray["wall_seconds"] / p["wall_seconds"], 3),
        # Each repeat's own ratio (its two runs ran back to back): the spread says how far the machine's
        # speed drifted between runs; their median is a second reading of the same overhead.
        "ratio_epoch_pairs": [round(r["epoch_seconds"] / q["epoch_seconds"], 3) for r, q in zip(rays, plains, strict=True)],
        "target_ratio_epoch": 1.15,
        # The training part of the timed epochs on each side (medians over repeats of their means): wall,
        # CPU seconds in user and kernel mode and page faults of the process that trained (Ray's worker
        # process includes Ray's own threads). User CPU is the work; kernel seconds that follow the page
        # faults are first-touched memory, which a VM's host may back slowly.
        "training_cpu": {"plain": cpu_summary(plains, max(1, args.epochs - 1)),
                         "ray_train": cpu_summary(rays, max(1, args.epochs - 1))},
        "env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": matmul_flags(),
                    "free_page_reporting": free_page_reporting()},
        "versions": {k: md.version(k) for k in ("torch", "transformers", "ray")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"medians: plain {p['wall_seconds']} s (epoch {p['epoch_seconds']} s), ray {ray['wall_seconds']} s "
          f"(epoch {ray['epoch_seconds']} s with its checkpoint, {ray['train_seconds']} s training); "
          f"ray.init {ray['ray_init_seconds']} s")
    results["ratio_epoch_pair_median"] = round(float(np.median(results["ratio_epoch_pairs"])), 3)
    # Epoch by epoch, the training part's ratio (median over repeats): the first epoch carries each
    # process's first touch of its memory, the later ones the steady state.
    results["ratio_train_by_epoch"] = [
        round(float(np.median([r["cpu"]["seconds"][e] / q["cpu"]["seconds"][e] for r, q in zip(rays, plains, strict=True)])), 3)
        for e in range(args.epochs)]
    tc = results["training_cpu"]
    results["ratio_cpu_user"] = round(tc["ray_train"]["cpu_user_seconds"] / tc["plain"]["cpu_user_seconds"], 3)
    for side, c in tc.items():
        print(f"{side} training (timed epochs): {c['seconds']:.2f} s wall, {c['cpu_user_seconds']:.2f} s user, "
              f"{c['cpu_system_seconds']:.2f} s system, {c['page_faults']:.0f} page faults, "
              f"peak resident {c['peak_rss_mib']:.0f} MiB")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Ray Train / plain: epoch {results['ratio_epoch']} (target <= 1.15), training alone "
          f"{results['ratio_train_only']}, whole call {results['ratio_whole_call']}, user CPU "
          f"{results['ratio_cpu_user']}; per repeat "
          f"{results['ratio_epoch_pairs']} (median {results['ratio_epoch_pair_median']}); training by epoch "
          f"{results['ratio_train_by_epoch']}; wrote {args.out}")


if __name__ == "__main__":
    main()
