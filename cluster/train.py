"""Ray Train (V2) around `engine.student`: students trained one after another in one TorchTrainer run.

`train_students` takes a list of jobs (label source, seed, train questions, targets), ships their token
rows and targets to the workers through the object store, and trains each job's student from fresh
pretrained weights with DDP (gloo on CPU, NCCL on GPU, both set up by TorchTrainer). It checkpoints
every epoch (Ray Train copies each to storage in the background while training goes on); when a job's
last epoch is done, rank 0 predicts the test split and the probabilities ride
along in every later checkpoint as `probs_<job>.npy`. One run per stage (or per benchmark dataset)
pays the worker group's start-up once rather than once per student. `train_student` is one job.

Checkpoints hold no pickles: weights and optimizer tensors are safetensors, everything else JSON/NPY.

Resume: Ray Train V2 keeps a checkpoint-manager snapshot under `<storage_dir>/<name>/`. A new call with
the same `storage_dir`, name and jobs picks that up, so `ray.train.get_checkpoint()` returns the latest
checkpoint (after a kill, or when a worker died and `FailureConfig` restarts the group): the run goes on
at the job and epoch after it. A single-job run asked for more epochs continues its job. A checkpoint
made under other jobs or settings (data, targets, model, hyper-parameters other than the worker
resources, and `epochs` when there are several jobs) is refused: use a fresh `storage_dir` per
experiment. On a multi-node cluster `storage_dir` must be shared storage (NFS or a URI Ray Train reads).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import LABEL_SOURCES, Config, StudentConfig, config_hash, to_dict
from engine.sequences import Sequences

KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run (the latest is what a resume starts from)."""

_MODEL = "model.safetensors"
_OPTIM = "optimizer.safetensors"
_STATE = "state.json"
_PROBS = "test_probs.npy"


# ---------------------------------------------------------------------------------------------
# Plain-array transport of Sequences (zero-copy through the object store, no engine classes pickled)


def pack_sequences(seqs: Sequences) -> dict[str, np.ndarray | str]:
    lengths = seqs.lengths()
    flat = np.concatenate(seqs.ids).astype(np.int64) if seqs.ids else np.zeros(0, dtype=np.int64)
    return {
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


def unpack_sequences(d: dict) -> Sequences:
    flat, off = d["flat"], d["offsets"]
    return Sequences(
        mode=str(d["mode"]),
        ids=[flat[off[i] : off[i + 1]] for i in range(len(off) - 1)],
        start=d["start"],
        row_question=d["row_question"],
        row_choice=d["row_choice"],
        n_choices=d["n_choices"],
        answer=d["answer"],
        letter_ids=d["letter_ids"],
    )


def _fingerprint(
    student: StudentConfig,
    seed: int,
    source: str,
    model_path: str,
    packed: dict,
    targets: np.ndarray,
    max_choices: int,
    pad_id: int,
) -> str:
    """What a resumed run must share with the checkpoint it resumes: all but `epochs` and resources."""
    h = hashlib.sha256()
    for key in ("flat", "offsets", "row_question", "row_choice", "n_choices", "answer"):
        h.update(np.ascontiguousarray(packed[key]).tobytes())
    h.update(np.ascontiguousarray(targets, dtype=np.float32).tobytes())
    s = to_dict(student)
    for key in ("epochs", "num_workers", "cpus_per_worker", "use_gpu"):  # more epochs / other resources are fine
        s.pop(key)
    return config_hash(
        {
            "student": s,
            "seed": seed,
            "source": source,
            "model": model_path,
            "mode": packed["mode"],
            "max_choices": max_choices,
            "pad_id": pad_id,
            "data": h.hexdigest(),
            "format": 2,
        }
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint files (safetensors + JSON)


def _save_optimizer(optimizer, path: Path) -> dict:
    """Tensors of the optimizer state to safetensors; returns the JSON-able rest."""
    import torch
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        entry = {"tensors": [], "values": {}}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                entry["tensors"].append(k)
            else:
                entry["values"][k] = v
        state[str(pid)] = entry
    save_file(tensors, str(path))
    return {"state": state, "param_groups": sd["param_groups"]}


def _load_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for pid, entry in meta["state"].items():
        st = {k: tensors[f"{pid}.{k}"] for k in entry["tensors"]}
        st.update(entry["values"])
        state[int(pid)] = st
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_checkpoint(d: Path, *, model, optimizer, scheduler, state: dict, probs: np.ndarray | None) -> None:
    from safetensors.torch import save_model

    save_model(model, str(d / _MODEL))
    state = dict(state, optimizer=_save_optimizer(optimizer, d / _OPTIM), schedule_step=scheduler.last_epoch)
    (d / _STATE).write_text(json.dumps(state))
    if probs is not None:
        np.save(d / _PROBS, np.asarray(probs, dtype=np.float32), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# The per-worker loop: the jobs in order, each from a fresh student, checkpointing every epoch


def _student_config(d: dict) -> StudentConfig:
    return StudentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _resume_point(state: dict | None, epochs: int, n_jobs: int) -> tuple[int, int]:
    """(job, epoch) to start at, given the latest checkpoint's state: its job continues while it has
    epochs left (a single-job run asked for more epochs continues), else the next job starts."""
    if state is None:
        return 0, 0
    job, epoch = int(state["job"]), int(state["epoch"])
    if epoch < epochs or job + 1 >= n_jobs:
        return job, epoch
    return job + 1, 0


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, load_model

    from engine import student as st

    scfg = _student_config(config["student"])
    jobs = config["jobs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(scfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    test = unpack_sequences(ray.get(config["test_ref"])) if rank == 0 else None
    pad_id, max_length = int(config["pad_id"]), scfg.max_length
    loss_kw = dict(soft=scfg.soft, temperature=scfg.temperature, alpha=scfg.alpha)

    state, ckpt_dir, done_probs, reported = None, None, {}, False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / _STATE).read_text())
            if state.get("fingerprint") != config["fingerprint"]:
                raise ValueError(
                    f"{config['name']}: the checkpoint under the run's storage was made with other data or "
                    "settings; pass a fresh storage_dir for a new experiment"
                )
            done_probs = {int(j): np.load(Path(d) / f"probs_{int(j):03d}.npy", allow_pickle=False)
                          for j in state["finished"] if rank == 0}
            ckpt_dir = tempfile.mkdtemp()  # keep the weights past the context manager
            for name in (_MODEL, _OPTIM):
                shutil.copyfile(Path(d, name), Path(ckpt_dir, name))
    start_job, start_epoch = _resume_point(state, scfg.epochs, len(jobs))
    finished = dict(state["finished"]) if state else {}
    resumes = [*state.get("resumes", []), [start_job, start_epoch]] if state else []  # where each restart began
    held = list(state.get("report_seconds", [])) if state else []  # each checkpoint's hold-up of the loop
    if state is not None and rank == 0:
        print(f"[{config['name']}] resumed at job {start_job + 1}/{len(jobs)}, epoch {start_epoch}/{scfg.epochs}",
              flush=True)

    for j in range(start_job, len(jobs)):
        job = jobs[j]
        seed, tag = int(job["seed"]), f"student-{job['source']}"
        torch.manual_seed(seed)
        train = unpack_sequences(ray.get(job["train_ref"]))
        targets = np.asarray(ray.get(job["targets_ref"]), dtype=np.float32)
        model = st.StudentModel.from_pretrained(
            config["model_path"], mode=train.mode, max_choices=int(config["max_choices"]), num_layers=scfg.num_layers
        )
        first = start_epoch if j == start_job else 0
        resuming = first > 0
        train_seconds = float(state["train_seconds"]) if resuming else 0.0
        history = list(state["history"]) if resuming else []
        if resuming:
            load_model(model, str(Path(ckpt_dir) / _MODEL), device="cpu")
        model = ray.train.torch.prepare_model(model)
        inner = st.unwrap(model)
        optimizer = st.make_optimizer(model, scfg.lr, scfg.weight_decay)
        per_worker = -(-train.n_questions // world)
        steps_per_epoch = -(-per_worker // scfg.batch_size)
        if resuming:
            _load_optimizer(optimizer, load_file(str(Path(ckpt_dir) / _OPTIM)), state["optimizer"])
        # The schedule is placed by epochs done (not restored): `epochs` or the worker count may differ.
        scheduler = st.make_scheduler(optimizer, steps_per_epoch * scfg.epochs, start_step=steps_per_epoch * first)

        for epoch in range(first, scfg.epochs):
            t0 = time.perf_counter()
            questions = st.shard_questions(train.n_questions, rank, world, seed=seed, epoch=epoch)
            batches = st.make_batches(train, targets, questions, scfg.batch_size, pad_id, max_length,
                                      rng=np.random.default_rng([seed, epoch, rank]))
            loss = st.train_epoch(model, batches, optimizer, scheduler, device=device, **loss_kw)
            if world > 1 and dist.is_available() and dist.is_initialized():
                buf = torch.tensor([loss * len(questions), float(len(questions))], dtype=torch.float64, device=device)
                dist.all_reduce(buf)
                loss = float((buf[0] / buf[1]).cpu())
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            history.append({"epoch": epoch + 1, "train_loss": loss, "seconds": seconds})
            metrics = {"job": j, "epoch": epoch + 1, "train_loss": loss, "start_epoch": first,
                       "train_seconds": train_seconds}
            if epoch + 1 == scfg.epochs and rank == 0:  # the job is done: score the test split
                probs = st.predict(inner, test, batch_size=scfg.batch_size, pad_id=pad_id, max_length=max_length,
                                   device=device)
                done_probs[j] = probs
                finished[str(j)] = {"epochs": epoch + 1, "start_epoch": first, "train_seconds": train_seconds,
                                    "history": history, "test_accuracy": st.accuracy(probs, test.answer)}
                metrics["test_accuracy"] = finished[str(j)]["test_accuracy"]
            if rank == 0:
                extra = f" test_acc {metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else ""
                print(f"[{tag}] job {j + 1}/{len(jobs)} epoch {epoch + 1}/{scfg.epochs} loss {loss:.4f} "
                      f"elapsed {train_seconds:.1f}s{extra}", flush=True)
            state = {"job": j, "epoch": epoch + 1, "fingerprint": config["fingerprint"],
                     "train_seconds": train_seconds, "history": history, "finished": finished, "resumes": resumes,
                     "report_seconds": held}
            held = [*held, _report(rank, metrics, state, inner, optimizer, scheduler, done_probs,
                                   f"job_{j:03d}_epoch_{epoch + 1:04d}")]
            reported = True
        start_epoch = 0
    if not reported:  # the stored run had finished every job: hand its results on as this run's
        state = {**state, "resumes": resumes}
        _report(rank, {"job": len(jobs) - 1, "epoch": scfg.epochs, "start_epoch": scfg.epochs}, state, inner,
                optimizer, scheduler, done_probs, None)
    if ckpt_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _report(rank, metrics, state, model, optimizer, scheduler, done_probs, dir_name) -> float:
    """Write rank 0's checkpoint to a local folder and report it; Ray Train copies it to storage in a
    background thread (ASYNC upload) and then deletes the local folder, so training goes on meanwhile.
    Returns the seconds this worker was held up (writing the files, and the report barrier)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    t0 = time.perf_counter()
    checkpoint = None
    if rank == 0:
        tmp = tempfile.mkdtemp(prefix="student-ckpt-")
        _write_checkpoint(Path(tmp), model=model, optimizer=optimizer, scheduler=scheduler, state=state, probs=None)
        for j, probs in done_probs.items():
            np.save(Path(tmp) / f"probs_{j:03d}.npy", np.asarray(probs, dtype=np.float32), allow_pickle=False)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name,
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class StudentJob:
    """One student to train: its label source, seed, train questions and targets (Q_train, C)."""

    source: str
    seed: int
    train: Sequences
    targets: np.ndarray

    def check(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"source: must be one of {LABEL_SOURCES}, got {self.source!r}")
        t, q = self.targets, self.train.n_questions
        if t.ndim != 2 or t.shape[0] != q or t.shape[1] < self.train.max_choices:
            raise ValueError(f"targets: expected shape ({q}, >= {self.train.max_choices}), got {t.shape}")
        if not np.isfinite(t).all():
            raise ValueError("targets: contains NaN or inf")


def train_students(
    student: StudentConfig,
    jobs: list[StudentJob],
    *,
    model_dir: str,
    test: Sequences,
    pad_id: int,
    storage_dir: str,
    name: str,
    max_failures: int | None = None,
) -> list[dict[str, Any]]:
    """Train every job's student, one after another, in one Ray Train run, and score each on `test`.

    One run amortises the worker group's start-up over many students (the benchmark trains dozens).
    Returns, per job, {"source", "seed", "test_accuracy", "test_probs" (Q_test, C), "train_seconds",
    "epochs", "history", "start_epoch", "wall_seconds" (of the whole run), "resumes" ([job, epoch] where
    each resumed attempt of the run began), "report_seconds" (of the run: how long each checkpoint but the
    last held up the loop; the copy to storage runs in the background)}. The run's checkpoints live
    under `<storage_dir>/<name>`; the same call after a kill resumes at the last finished epoch.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.student import resolve_student_path

    if not jobs:
        return []
    for job in jobs:
        job.check()
        if job.train.mode != test.mode:
            raise ValueError(f"train rows are {job.train.mode!r} but test rows are {test.mode!r}")
    model_path = resolve_student_path(student, model_dir)
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)
    max_choices = max(max(j.train.max_choices for j in jobs), test.max_choices)
    packed = [pack_sequences(j.train) for j in jobs]
    targets = [np.ascontiguousarray(j.targets, dtype=np.float32) for j in jobs]
    prints = [_fingerprint(student, j.seed, j.source, model_path, p, t, max_choices, pad_id)
              for j, p, t in zip(jobs, packed, targets, strict=True)]
    # One job may be continued with more epochs; in a run of several, finished jobs would be stale.
    fingerprint = prints[0] if len(jobs) == 1 else config_hash({"jobs": prints, "epochs": student.epochs})
    loop_config = {
        "name": name,
        "student": to_dict(student),
        "model_path": model_path,
        "max_choices": max_choices,
        "pad_id": int(pad_id),
        "fingerprint": fingerprint,
        "test_ref": ray.put(pack_sequences(test)),
        "jobs": [{"source": j.source, "seed": j.seed, "train_ref": ray.put(p), "targets_ref": ray.put(t)}
                 for j, p, t in zip(jobs, packed, targets, strict=True)],
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=student.num_workers,
            use_gpu=student.use_gpu,
            resources_per_worker={"CPU": student.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=os.path.abspath(storage_dir),
            name=name,
            failure_config=FailureConfig(
                max_failures=student.max_failures if max_failures is None else max_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    out = []
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / _STATE).read_text())
        finished = state["finished"]
        for j, job in enumerate(jobs):
            if str(j) not in finished:
                raise RuntimeError(f"{name}: job {j} ({job.source}, seed {job.seed}) has no result")
            probs = np.load(Path(d) / f"probs_{j:03d}.npy", allow_pickle=False)
            done = finished[str(j)]
            acc = float((probs.argmax(-1) == test.answer).mean()) if test.n_questions else float("nan")
            out.append({"source": job.source, "seed": job.seed, "test_accuracy": acc, "test_probs": probs,
                        "train_seconds": float(done["train_seconds"]), "epochs": int(done["epochs"]),
                        "history": done["history"], "start_epoch": int(done["start_epoch"]), "wall_seconds": wall,
                        "checkpoint_path": result.checkpoint.path, "resumes": state.get("resumes", []),
                        "report_seconds": state.get("report_seconds", [])})
    return out


def train_student(
    cfg: Config,
    *,
    source: str,
    model_dir: str,
    train: Sequences,
    targets: np.ndarray,
    test: Sequences,
    pad_id: int,
    storage_dir: str,
) -> dict[str, Any]:
    """Train one student on `targets` (Q_train, C) and score it on `test`: `train_students` with one job,
    run under the name `student-<source>`."""
    job = StudentJob(source, cfg.seed, train, np.asarray(targets))
    return train_students(cfg.student, [job], model_dir=model_dir, test=test, pad_id=pad_id,
                          storage_dir=storage_dir, name=f"student-{source}")[0]
