"""Ray Train (V2) around `engine.student`: students trained one after another in one TorchTrainer run.

`train_students` takes a list of jobs (label source, seed, train questions, targets) over one set of
splits tokenized for the student, ships them to the workers through the object store, and trains each
job's student from fresh pretrained weights with DDP (gloo on CPU, NCCL on GPU, both set up by
TorchTrainer). After every epoch rank 0 scores the validation split; the best epoch (validation
accuracy, then loss: `engine.student.best_epoch`) is the student that is kept. When a job's last epoch
is done, rank 0 scores the test split with that student and writes it as a model folder
(`engine.student.save_student`) under `<storage_dir>/<name>-students/job_<j>`; its test and validation
probabilities ride along in every later checkpoint. One run per stage (or per benchmark dataset) pays
the worker group's start-up once rather than once per student. `train_student` is one job.

With `student.finetune='head'` the frozen backbone's pooled features of each split are computed once,
by a Ray task, and cached under `features_dir` keyed by their identity; the workers train heads on them.
With 'top' the same holds for the token states of the frozen blocks below the trained ones: the workers
run only the top blocks (`engine.student.skip_bottom`), for every epoch, split and student.

Checkpoints hold no pickles: trainable weights (the current and the best epoch's) and optimizer tensors
are safetensors, everything else JSON/NPY. Full and top-block students checkpoint every epoch, heads at
the end of each job (their epochs take milliseconds).

Resume: Ray Train V2 keeps a checkpoint-manager snapshot under `<storage_dir>/<name>/`. A new call with
the same `storage_dir`, name and jobs picks that up, so `ray.train.get_checkpoint()` returns the latest
checkpoint (after a kill, or when a worker died and `FailureConfig` restarts the group): the run goes on
at the job and epoch after it. A single-job run asked for more epochs continues its job. A checkpoint
made under other jobs or settings (data, targets, model, hyper-parameters other than the worker
resources, and `epochs` when there are several jobs) is refused: use a fresh `storage_dir` per
experiment. On a multi-node cluster `storage_dir` must be shared storage (NFS or a URI Ray Train reads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster import runtime
from engine import fit
from engine.config import StudentConfig, config_hash, to_dict
from engine.fit import StudentJob
from engine.hardware import pick_dtype
from engine.labels import loss_alpha
from engine.log import log, progress, verbose
from engine.sequences import Sequences

KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run (the latest is what a resume starts from); every finished student's folder
is kept apart from them."""

ROLES = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------
# Plain-array transport of Sequences (zero-copy through the object store, no engine classes pickled)


def pack_sequences(seqs: Sequences) -> dict[str, np.ndarray | str]:
    lengths = seqs.lengths()
    flat = np.concatenate(seqs.ids).astype(np.int64) if seqs.ids else np.zeros(0, dtype=np.int64)
    out = {
        "mode": seqs.mode,
        "flat": flat,
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "start": np.asarray(seqs.start),
        "row_question": np.asarray(seqs.row_question),
        "row_choice": np.asarray(seqs.row_choice),
        "n_choices": np.asarray(seqs.n_choices),
        "answer": np.asarray(seqs.answer),
        "letter_ids": np.asarray(seqs.letter_ids),
    }
    if seqs.type_ids is not None:
        out["types"] = np.concatenate(seqs.type_ids).astype(np.int64) if seqs.type_ids else np.zeros(0, np.int64)
    return out


def unpack_sequences(d: dict) -> Sequences:
    flat, off = d["flat"], d["offsets"]
    rows = range(len(off) - 1)
    return Sequences(
        mode=str(d["mode"]),
        ids=[flat[off[i] : off[i + 1]] for i in rows],
        start=d["start"],
        row_question=d["row_question"],
        row_choice=d["row_choice"],
        n_choices=d["n_choices"],
        answer=d["answer"],
        letter_ids=d["letter_ids"],
        type_ids=[d["types"][off[i] : off[i + 1]] for i in rows] if "types" in d else None,
    )


def _split_digest(packed: dict) -> str:
    keys = ("flat", "offsets", "row_question", "row_choice", "n_choices", "answer", "start", "types")
    return fit.digest(*(packed[k] for k in keys if k in packed))


def _weights_stamp(model_path: str) -> list:
    """What identifies the weights at a local path (name, size, mtime of each safetensors file)."""
    p = Path(model_path)
    if not p.is_dir():
        return [model_path]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# The per-worker loop: `engine.fit` over the jobs in order, with DDP's loss reduction and Ray's checkpoints


def _student_config(d: dict) -> StudentConfig:
    return StudentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


TRAIN_WORKER_ENV = {"OMP_NUM_THREADS": "1"}
"""A Ray Train worker runs the loop in a thread of its own, which sets its own thread count
(`student.cpus_per_worker`). With Ray's default (the worker's CPUs) the worker's main thread may keep a
second OpenMP pool, and libgomp, seeing more threads than cores, stops spinning between parallel
regions; with one thread for the main thread the loop's pool is the only one (`bench/omp_threads.py`).
For the same reason, the loop's thread, the worker gets one malloc arena, and on CPU keeps the memory it
frees (`cluster.runtime.compute_env`)."""


def train_worker_env(use_gpu: bool) -> dict[str, str]:
    """The environment a Ray Train worker process starts with (read by glibc and libgomp at start-up)."""
    return {**TRAIN_WORKER_ENV, **runtime.compute_env(use_gpu)}


def _train_loop(config: dict) -> None:
    """Ray Train's worker loop: read the splits, resume from the latest checkpoint, then each job through
    `_train_job`. A stored run that had finished every job hands its results on as this run's."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from engine import student as st

    scfg = _student_config(config["student"])
    if not config.get("verbose", True):
        _quiet_worker_reports()
    ctx = ray.train.get_context()
    torch.set_num_threads(scfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    dtype, dtype_why = pick_dtype(scfg.dtype, gpu=device.type == "cuda")  # decided where the student trains
    worker = fit.Worker(ctx.get_world_rank(), ctx.get_world_size(), device, dtype, _all_reduce(device))
    roles = ROLES if worker.rank == 0 else ("train",)
    splits = {r: unpack_sequences(ray.get(config["split_refs"][r])) for r in roles}
    feats = {r: ray.get(config["feature_refs"][r]) for r in roles} if config["feature_refs"] else {}
    if feats and scfg.finetune == "top":  # the frozen bottom blocks' token states
        feats = {r: st.TokenStates.of(splits[r], a) for r, a in feats.items()}
    tokenizer = None
    if worker.rank == 0:
        kw = dict(revision=scfg.revision, trust_remote_code=scfg.trust_remote_code)
        tokenizer = st.load_tokenizer(config["model_path"], st.load_config(config["model_path"], **kw), **kw)
    ckpt = _latest_checkpoint(config, best=worker.rank == 0)
    state = ckpt.state if ckpt else None
    start_job, start_epoch = fit.resume_point(state, scfg.train_epochs, len(config["jobs"]))
    run = {"finished": dict(state["finished"]) if state else {},
           "resumes": [*state.get("resumes", []), [start_job, start_epoch]] if state else [],  # each restart's start
           "held": list(state.get("report_seconds", [])) if state else [],  # each checkpoint's hold-up of the loop
           "dtype": dtype, "dtype_why": dtype_why, "reported": False}
    if state is not None and worker.rank == 0:
        print(f"[{config['name']}] resumed at job {start_job + 1}/{len(config['jobs'])}, epoch "
              f"{start_epoch}/{scfg.train_epochs}", flush=True)
    for j in range(start_job, len(config["jobs"])):
        resume = ckpt if j == start_job and start_epoch > 0 else None
        if resume is None or start_epoch < scfg.train_epochs:
            _train_job(config, scfg, j, splits, feats, tokenizer, worker, run, resume, start_epoch if resume else 0)
    if not run["reported"]:  # the stored run had finished every job: hand its results on as this run's
        saved = (ckpt.current, None, ckpt.optimizer, ckpt.state["schedule_step"]) if worker.rank == 0 else None
        _report(worker.rank, {"job": len(config["jobs"]) - 1, "epoch": scfg.train_epochs,
                              "start_epoch": scfg.train_epochs}, {**state, "resumes": run["resumes"]}, saved, None)


def _quiet_worker_reports() -> None:
    """Ray Train's worker logs every report ("Reporting training result ...") at INFO on a logger named
    after its file, which `LoggingConfig` does not reach: raised to WARNING unless --verbose."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _all_reduce(device):
    """The question-weighted mean loss over the worker group (None outside a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def reduce(loss: float, n: int) -> float:
        buf = torch.tensor([loss * n, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(buf)
        return float((buf[0] / buf[1]).cpu())

    return reduce


def _latest_checkpoint(config: dict, *, best: bool) -> fit.Checkpoint | None:
    """Ray Train's latest checkpoint of this run, read into memory; one made under other data or
    settings is refused."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        out = fit.read_checkpoint(d, best=best)
    if out.state.get("fingerprint") != config["fingerprint"]:
        raise ValueError(f"{config['name']}: the checkpoint under the run's storage was made with other data or "
                         "settings; pass a fresh storage_dir for a new experiment")
    return out


def _train_job(config: dict, scfg: StudentConfig, j: int, splits: dict, feats: dict, tokenizer,
               worker: fit.Worker, run: dict, resume: fit.Checkpoint | None, first: int) -> None:
    """Job `j` from fresh pretrained weights (or its checkpoint): `engine.fit.fit_job`, a checkpoint per
    epoch (heads: per job); after the last epoch rank 0 writes the student's folder."""
    import ray
    import ray.train.torch
    import torch

    from engine import student as st

    job, epochs, pad_id = config["jobs"][j], scfg.train_epochs, int(config["pad_id"])
    torch.manual_seed(int(job["seed"]))
    triple = fit.job_targets(ray.get(job["questions_ref"]), ray.get(job["targets_ref"]), ray.get(job["answers_ref"]),
                             splits["train"], int(config["max_choices"]))
    model = st.build_student(config["model_path"], scfg, max_choices=int(config["max_choices"]),
                             answer_format=config["spec"]["answer_format"], tokenizer=tokenizer)
    names = st.set_trainable(model, scfg.finetune, scfg.top_blocks)
    if feats and scfg.finetune == "top":
        st.skip_bottom(model, scfg.top_blocks)  # batches bring the frozen bottom's states
    backbone_dir = _backbone_dir(config, scfg, model, worker.rank)
    progress = fit.JobProgress()
    if resume is not None:
        fit.load_trainable(model, resume.current, names)
        progress = fit.JobProgress.resumed(resume, first)
    model = ray.train.torch.prepare_model(model)
    inner = st.unwrap(model)
    optimizer = st.make_optimizer(model, scfg.train_lr, scfg.weight_decay)
    steps_per_epoch = fit.steps_per_epoch(len(triple[0]), worker.world, scfg.train_batch_size)
    if resume is not None:
        fit.load_optimizer(optimizer, resume.optimizer)
    # The schedule is placed by epochs done (not restored): `epochs` or the worker count may differ.
    scheduler = st.make_scheduler(optimizer, steps_per_epoch * epochs, start_step=steps_per_epoch * first)
    every = epochs if scfg.finetune == "head" else 1  # heads checkpoint once per job

    def on_epoch(epoch: int, entry: dict) -> None:
        last = epoch == epochs
        metrics = {"job": j, "epoch": epoch, "train_loss": entry["train_loss"], "start_epoch": first}
        if worker.rank == 0:
            metrics["val_acc"] = entry["val_acc"]
            if last:  # the job is done: its best epoch is the student
                metrics["test_accuracy"] = _save_job(config, scfg, j, model, names, splits, feats, tokenizer, worker,
                                                     run, progress, first, backbone_dir)
            if scfg.finetune != "head" or last:
                _print_epoch(config, j, epoch, epochs, entry, progress, run, metrics)
        if epoch % every and not last:
            return
        state = {"job": j, "epoch": epoch, "fingerprint": config["fingerprint"],
                 "train_seconds": progress.train_seconds, "history": progress.history, "finished": run["finished"],
                 "resumes": run["resumes"], "report_seconds": run["held"]}
        # The best epoch is most often the one just trained (and after the last epoch the model holds
        # the best weights): then they are written once.
        state["best_is_current"] = worker.rank == 0 and (last or st.best_epoch(progress.history) == epoch)
        current = fit.trainable_state(inner, names) if worker.rank == 0 else None
        saved = (current, None if state["best_is_current"] else progress.best,
                 fit.optimizer_state(optimizer) if worker.rank == 0 else None, scheduler.last_epoch)
        run["held"] = [*run["held"], _report(worker.rank, metrics, state, saved, f"job_{j:03d}_epoch_{epoch:04d}")]
        run["reported"] = True

    fit.fit_job(model, names, splits, triple, scfg=scfg, seed=int(job["seed"]), alpha=float(job["alpha"]),
                epochs=epochs, pad_id=pad_id, optimizer=optimizer, scheduler=scheduler, worker=worker,
                progress=progress, features=feats, on_epoch=on_epoch)


def _backbone_dir(config: dict, scfg: StudentConfig, model, rank: int) -> Path | None:
    """Head students: the frozen backbone, written once and hard-linked into every student's folder."""
    if scfg.finetune != "head" or rank != 0:
        return None
    out = Path(config["students_dir"]) / "backbone"
    if not out.exists():
        tmp = Path(tempfile.mkdtemp(prefix="backbone.tmp-", dir=out.parent))
        model.backbone.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out)
    return out


def _save_job(config, scfg, j, model, names, splits, feats, tokenizer, worker, run, progress, first,
              backbone_dir) -> float:
    """Rank 0, a job's last epoch: its student folder (best epoch) and its test and validation
    probabilities beside it; returns its test accuracy."""
    from engine import student as st
    from engine import student_folder as sf

    done = fit.finish_job(model, names, splits, progress, scfg=scfg, pad_id=int(config["pad_id"]), worker=worker,
                          features=feats)
    m = done.metrics(splits)
    folder = Path(config["students_dir"]) / f"job_{j:03d}"
    shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed attempt
    meta = {**config["jobs"][j]["meta"], "dtype": run["dtype"], "dtype_why": run["dtype_why"],
            "best_epoch": m["best_epoch"], "history": progress.history, "test_acc": m["test_acc"], "val_acc": m["val_acc"]}
    sf.save_student(folder, st.unwrap(model), tokenizer, st.InputSpec(**config["spec"]), meta, backbone_dir=backbone_dir)
    np.save(folder.parent / f"job_{j:03d}.test_probs.npy", done.test_probs, allow_pickle=False)
    np.save(folder.parent / f"job_{j:03d}.val_probs.npy", done.val_probs, allow_pickle=False)
    run["finished"][str(j)] = {"epochs": scfg.train_epochs, "start_epoch": first,
                               "train_seconds": progress.train_seconds, "history": progress.history,
                               "best_epoch": m["best_epoch"], "test_accuracy": m["test_acc"]}
    return m["test_acc"]


def _print_epoch(config, j, epoch, epochs, entry, progress, run, metrics) -> None:
    extra = f" val_acc {entry['val_acc']:.4f}"
    if "test_accuracy" in metrics:
        extra += f"; kept epoch {run['finished'][str(j)]['best_epoch']}, test_acc {metrics['test_accuracy']:.4f}"
    print(f"[student-{config['jobs'][j]['source']}] job {j + 1}/{len(config['jobs'])} epoch {epoch}/{epochs} "
          f"loss {entry['train_loss']:.4f} elapsed {progress.train_seconds:.1f}s{extra}", flush=True)


def _report(rank, metrics, state, saved, dir_name) -> float:
    """Write rank 0's checkpoint (`saved`: current weights, best weights or None, optimizer state,
    schedule step) and report it. Where the run's storage is a local (or shared) folder, the files are
    written straight into it, under a hidden name renamed into place when complete, and reported as they
    are (NO_UPLOAD): nothing is copied a second time. Elsewhere they go to a local folder that Ray Train
    uploads in a background thread (ASYNC). Returns the seconds this worker was held up (writing the
    files, and the report barrier)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    t0 = time.perf_counter()
    storage = ray.train.get_context().get_storage()
    direct = dir_name is not None and type(storage.storage_filesystem).__name__ == "LocalFileSystem"
    checkpoint, mode = None, CheckpointUploadMode.NO_UPLOAD if direct else CheckpointUploadMode.ASYNC
    if rank == 0:
        current, best, optimizer, step = saved
        if direct:
            final = Path(storage.build_checkpoint_path_from_name(dir_name))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dir_name}.tmp-", dir=final.parent))
        else:
            final, tmp = None, Path(tempfile.mkdtemp(prefix="student-ckpt-"))
        fit.write_checkpoint(tmp, current=current, best=best, optimizer=optimizer, schedule_step=step, state=state)
        if final is not None:
            if final.exists():  # written by an attempt killed before Ray registered it
                shutil.rmtree(final)
            os.replace(tmp, final)
            tmp = final
        checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name, checkpoint_upload_mode=mode)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The frozen part of a student (head: the pooled features; top: the bottom blocks' token states), computed
# once per split and cached


class _CheckpointWatch:
    """Advances a progress bar from the driver while `fit()` runs: a worker's lines cannot draw on the
    driver's console, but its checkpoints appear under the run's storage as `job_<j>_epoch_<e>`, so
    the latest one says how many epochs are done (older ones are deleted as new ones come)."""

    def __init__(self, folder: Path, per_job: int, bar, every: float = 1.0) -> None:
        import threading

        self.folder, self.per_job, self.bar, self.every = folder, per_job, bar, every
        self.done, self.stop = self._count(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if bar.shown else None

    def _count(self) -> int:
        best = 0
        for p in self.folder.glob("job_*_epoch_*") if self.folder.is_dir() else ():
            try:
                j, e = int(p.name.split("_")[1]), int(p.name.split("_")[3])
            except (IndexError, ValueError):
                continue
            best = max(best, j * self.per_job + min(e, self.per_job))
        return best

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            n = self._count()
            if n > self.done:
                self.bar.update(n - self.done)
                self.done = n

    def __enter__(self):
        self.bar.update(self.done)  # a resumed run starts where its checkpoints are
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _features(model_path: str, student: dict, spec: dict, packed: dict, max_choices: int, pad_id: int) -> np.ndarray:
    """What the frozen part computes once for a split: pooled features ('head') or the bottom blocks'
    token states ('top')."""
    import torch

    from engine import student as st

    scfg = _student_config(student)
    torch.set_num_threads(scfg.cpus_per_worker)
    device = "cuda" if scfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = st.build_student(model_path, scfg, max_choices=max_choices, answer_format=spec["answer_format"]).to(device)
    dtype, _ = pick_dtype(scfg.dtype, gpu=device == "cuda")
    kw = dict(batch_size=4 * scfg.train_batch_size, pad_id=pad_id, device=device, dtype=dtype)
    if scfg.finetune == "top":
        return st.bottom_states(model, unpack_sequences(packed), top_blocks=scfg.top_blocks, **kw)
    return st.pool_features(model, unpack_sequences(packed), **kw)


def cached_features(student: StudentConfig, model_path: str, spec: dict, packed: dict[str, dict], max_choices: int,
                    pad_id: int, features_dir: str) -> dict[str, np.ndarray]:
    """What the frozen part of the student computes, per split: the pooled features of the frozen
    backbone ('head'), or the token states of the frozen bottom blocks ('top'). Read from `features_dir`
    when a file of the same identity (weights, blocks, pooling or trained blocks, the split's tokens) is
    there, else computed by one Ray task per split and written atomically."""
    import ray

    ident = {"model": model_path, "weights": _weights_stamp(model_path), "revision": student.revision,
             "num_layers": student.num_layers, "pooling": student.pooling, "spec": spec,
             "dtype": pick_dtype(student.dtype, gpu=student.use_gpu)[0]}
    if student.finetune == "top":  # the token states below the trained blocks (the head's identity is as it was)
        ident = {**ident, "bottom_of": "top", "top_blocks": student.top_blocks, "scoring": student.scoring}
        del ident["pooling"]
    out, todo = {}, {}
    Path(features_dir).mkdir(parents=True, exist_ok=True)
    for role, p in packed.items():
        path = Path(features_dir) / f"{role}-{config_hash({**ident, 'split': _split_digest(p)})}.npy"
        if path.is_file():
            out[role] = np.load(path, allow_pickle=False)
            continue
        task = ray.remote(_features).options(num_cpus=student.cpus_per_worker, num_gpus=1 if student.use_gpu else 0)
        todo[role] = (path, task.remote(model_path, to_dict(student), spec, p, max_choices, pad_id))
    what = "the frozen bottom blocks' token states" if student.finetune == "top" else "the frozen backbone's pooled features"
    t0 = time.perf_counter()
    for role, (path, ref) in todo.items():
        arr = ray.get(ref)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
        out[role] = arr
    if todo:
        log("train", f"{what} of {', '.join(todo)} computed once ({sum(len(out[r]) for r in todo)} vectors) in "
                     f"{time.perf_counter() - t0:.1f} s, cached in {features_dir}")
    if len(todo) < len(packed):
        log("train", f"{what} of {', '.join(r for r in packed if r not in todo)} read from {features_dir}")
    return out


# ---------------------------------------------------------------------------------------------
# Driver side


def train_students(
    student: StudentConfig,
    jobs: list[StudentJob],
    *,
    model_path: str,
    splits: dict[str, Sequences],
    spec,
    pad_id: int,
    storage_dir: str,
    name: str,
    features_dir: str | None = None,
    max_failures: int | None = None,
) -> list[dict[str, Any]]:
    """Train every job's student, one after another, in one Ray Train run; pick each one's epoch on
    `splits['validation']` and score it on `splits['test']`. `spec` is the students' `InputSpec`.

    Returns, per job, {"source", "seed", "test_accuracy", "test_probs" (Q_test, C), "val_probs", "student_dir"
    (its model folder), "best_epoch", "history" (per epoch: train_loss, val_acc, val_loss, seconds),
    "train_seconds", "epochs", "start_epoch", "wall_seconds" (of the whole run), "resumes" ([job, epoch]
    where each resumed attempt began), "report_seconds" (how long each checkpoint but the last held up
    the loop)}. Checkpoints live under `<storage_dir>/<name>`, student folders under
    `<storage_dir>/<name>-students`; the same call after a kill resumes at the last checkpoint.
    """
    if not jobs:
        return []
    _check_inputs(jobs, splits)
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)
    loop_config = _loop_config(student, jobs, model_path, splits, spec, pad_id, storage_dir, name, features_dir)
    trainer = _trainer(student, loop_config, storage_dir, name, max_failures)
    t0, started = time.perf_counter(), time.time()
    per_job = 1 if student.finetune == "head" else student.train_epochs
    with progress("train", len(jobs) * per_job, "epoch" if per_job > 1 else "student") as bar:
        with _CheckpointWatch(Path(storage_dir).absolute() / name, per_job, bar):
            result = trainer.fit()
    timing = {"wall_seconds": time.perf_counter() - t0, "fit_window": [started, time.time()]}
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    return _collect(result.checkpoint, jobs, splits["test"], Path(loop_config["students_dir"]), name, timing)


def _check_inputs(jobs: list[StudentJob], splits: dict[str, Sequences]) -> None:
    missing = [r for r in ROLES if r not in splits]
    if missing:
        raise ValueError(f"splits: missing {missing}")
    for job in jobs:
        job.check(splits["train"])
    if len({s.mode for s in splits.values()}) != 1:
        raise ValueError("splits: every split must be tokenized in the same mode")


def _loop_config(student: StudentConfig, jobs: list[StudentJob], model_path: str, splits: dict[str, Sequences],
                 spec, pad_id: int, storage_dir: str, name: str, features_dir: str | None) -> dict:
    """What every worker gets: the settings, the run's fingerprint, and object-store references to the
    tokenized splits, the head regime's cached features and each job's questions and targets."""
    import ray

    from engine import student as st

    max_choices = max(s.max_choices for s in splits.values())
    packed = {r: pack_sequences(splits[r]) for r in ROLES}
    digests = {r: _split_digest(p) for r, p in packed.items()}
    spec_d = spec.to_dict()
    prints = [fit.fingerprint(student, j, model_path, digests, spec_d, max_choices, pad_id) for j in jobs]
    feature_refs = {}
    if student.finetune == "head" or st.frozen_bottom(student, model_path):
        if features_dir is None:
            raise ValueError(f"features_dir: student.finetune={student.finetune!r} caches what the frozen part of the "
                             "student computes there; pass a folder")
        feats = cached_features(student, model_path, spec_d, packed, max_choices, pad_id, features_dir)
        feature_refs = {r: ray.put(a) for r, a in feats.items()}
    students_dir = Path(storage_dir).absolute() / f"{name}-students"
    students_dir.mkdir(parents=True, exist_ok=True)
    return {
        "name": name, "student": to_dict(student), "spec": spec_d, "model_path": model_path,
        "max_choices": max_choices, "pad_id": int(pad_id), "fingerprint": fit.run_fingerprint(prints, student.train_epochs),
        "students_dir": str(students_dir), "split_refs": {r: ray.put(p) for r, p in packed.items()},
        "feature_refs": feature_refs, "verbose": verbose(),
        "jobs": [{"source": j.source, "seed": j.seed, "alpha": loss_alpha(j.source, student.alpha, student.mix_alpha),
                  "meta": {"source": j.source, "seed": j.seed, **(j.meta or {})},
                  "questions_ref": ray.put(np.asarray(j.questions, np.int64)),
                  "targets_ref": ray.put(np.ascontiguousarray(j.targets, dtype=np.float32)),
                  "answers_ref": ray.put(np.asarray(j.answers, np.int64))} for j in jobs],
    }


def _trainer(student: StudentConfig, loop_config: dict, storage_dir: str, name: str, max_failures: int | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=student.num_workers, use_gpu=student.use_gpu,
                                     resources_per_worker={"CPU": student.cpus_per_worker}),
        run_config=RunConfig(
            storage_path=str(Path(storage_dir).absolute()),
            name=name,
            failure_config=FailureConfig(max_failures=student.max_failures if max_failures is None else max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            worker_runtime_env={"env_vars": train_worker_env(student.use_gpu)},
            # Ray Train's own lines (worker group starting, each report, moving the model) only with
            # --verbose; the students' own epoch lines are prints and always shown.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    # Ctrl-C must reach the driver as KeyboardInterrupt, as in every other stage, so `distill` prints one
    # line and the same command resumes from the last checkpoint. Ray Train's own SIGINT handler would
    # abort the run and sys.exit() from inside the handler instead (and it stays installed after fit()).
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    return trainer


def _collect(checkpoint, jobs: list[StudentJob], test: Sequences, students_dir: Path, name: str,
             timing: dict) -> list[dict[str, Any]]:
    """Each job's result from the run's last checkpoint and the student folders beside it."""
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / fit.CKPT_STATE).read_text())
    out = []
    for j, job in enumerate(jobs):
        folder = students_dir / f"job_{j:03d}"
        done = state["finished"].get(str(j))
        if done is None or not folder.is_dir():
            raise RuntimeError(f"{name}: job {j} ({job.source}, seed {job.seed}) has no result")
        probs = np.load(students_dir / f"job_{j:03d}.test_probs.npy", allow_pickle=False)
        out.append({"source": job.source, "seed": job.seed, "test_accuracy": float((probs.argmax(-1) == test.answer).mean()),
                    "test_probs": probs, "val_probs": np.load(students_dir / f"job_{j:03d}.val_probs.npy"),
                    "student_dir": str(folder), "best_epoch": int(done["best_epoch"]),
                    "train_seconds": float(done["train_seconds"]), "epochs": int(done["epochs"]),
                    "history": done["history"], "start_epoch": int(done["start_epoch"]), **timing,
                    "checkpoint_path": checkpoint.path, "resumes": state.get("resumes", []),
                    "report_seconds": state.get("report_seconds", [])})
    return out


def train_student(student: StudentConfig, job: StudentJob, **kw) -> dict[str, Any]:
    """One student: `train_students` with one job, run under the name `student-<source>`."""
    return train_students(student, [job], name=kw.pop("name", f"student-{job.source}"), **kw)[0]
