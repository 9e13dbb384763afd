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

from engine.config import STUDENT_RUNTIME, StudentConfig, config_hash, to_dict
from engine.hardware import pick_dtype
from engine.labels import SOURCES, loss_alpha
from engine.sequences import Sequences

KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run (the latest is what a resume starts from); every finished student's folder
is kept apart from them."""

_MODEL = "trainable.safetensors"
_BEST = "best.safetensors"
_OPTIM = "optimizer.safetensors"
_STATE = "state.json"
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


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _split_digest(packed: dict) -> str:
    keys = ("flat", "offsets", "row_question", "row_choice", "n_choices", "answer", "start", "types")
    return _digest(*(packed[k] for k in keys if k in packed))


def _weights_stamp(model_path: str) -> list:
    """What identifies the weights at a local path (name, size, mtime of each safetensors file)."""
    p = Path(model_path)
    if not p.is_dir():
        return [model_path]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.glob("*.safetensors"))


def _fingerprint(student: StudentConfig, job: StudentJob, model_path: str, splits: dict[str, str], spec: dict,
                 max_choices: int, pad_id: int) -> str:
    """What a resumed run must share with the checkpoint it resumes: all but `epochs` and resources."""
    s = to_dict(student)
    for key in ("epochs", "head_epochs", "label_sources", *STUDENT_RUNTIME):  # more epochs / other resources are fine
        s.pop(key)
    if s.get("template") is None:  # added later; the spec carries it when set
        s.pop("template", None)
    return config_hash({
        "student": s, "seed": job.seed, "source": job.source, "model": model_path, "spec": spec,
        "max_choices": max_choices, "pad_id": pad_id, "splits": splits,
        "job": _digest(job.questions, np.asarray(job.targets, np.float32), job.answers), "format": 3,
    })


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


def _trainable_state(model, names: list[str]) -> dict:
    sd = model.state_dict()
    return {n: sd[n].detach().cpu().clone().contiguous() for n in names}


def _load_trainable(model, tensors: dict, names: list[str]) -> None:
    if sorted(tensors) != sorted(names):
        raise ValueError("the checkpoint's trainable weights do not match the student's; use a fresh storage_dir")
    model.load_state_dict(tensors, strict=False)


def _write_checkpoint(d: Path, *, current: dict, best: dict | None, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(current, str(d / _MODEL))
    if best is not None:
        save_file(best, str(d / _BEST))
    state = dict(state, optimizer=_save_optimizer(optimizer, d / _OPTIM), schedule_step=scheduler.last_epoch)
    (d / _STATE).write_text(json.dumps(state))


# ---------------------------------------------------------------------------------------------
# The per-worker loop: the jobs in order, each from a fresh student, scored on validation every epoch


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


TRAIN_WORKER_ENV = {"OMP_NUM_THREADS": "1"}
"""A Ray Train worker runs the loop in a thread of its own, which sets its own thread count
(`student.cpus_per_worker`). With Ray's default (the worker's CPUs) the worker's main thread may keep a
second OpenMP pool, and libgomp, seeing more threads than cores, stops spinning between parallel
regions; with one thread for the main thread the loop's pool is the only one (`bench/omp_threads.py`)."""


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from engine import student as st
    from engine import student_folder as sf
    from engine.metrics import accuracy, nll

    scfg = _student_config(config["student"])
    spec = st.InputSpec(**config["spec"])
    jobs, epochs = config["jobs"], scfg.train_epochs
    every = epochs if scfg.finetune == "head" else 1  # heads checkpoint once per job
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(scfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    dtype, dtype_why = pick_dtype(scfg.dtype, gpu=device.type == "cuda")  # decided where the student trains
    roles = ROLES if rank == 0 else ("train",)
    splits = {r: unpack_sequences(ray.get(config["split_refs"][r])) for r in roles}
    feats = {r: ray.get(config["feature_refs"][r]) for r in roles} if config["feature_refs"] else {}
    train = splits["train"]
    pad_id, model_path = int(config["pad_id"]), config["model_path"]
    loss_kw = dict(soft=scfg.soft, temperature=scfg.temperature)
    out_root = Path(config["students_dir"])
    tokenizer = st.load_tokenizer(model_path, st.load_config(model_path, revision=scfg.revision,
                                  trust_remote_code=scfg.trust_remote_code), revision=scfg.revision,
                                  trust_remote_code=scfg.trust_remote_code) if rank == 0 else None

    state, ckpt_dir, reported = None, None, False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / _STATE).read_text())
            if state.get("fingerprint") != config["fingerprint"]:
                raise ValueError(
                    f"{config['name']}: the checkpoint under the run's storage was made with other data or "
                    "settings; pass a fresh storage_dir for a new experiment"
                )
            ckpt_dir = tempfile.mkdtemp()  # keep the weights past the context manager
            for name in (_MODEL, _BEST, _OPTIM):
                if Path(d, name).is_file():
                    shutil.copyfile(Path(d, name), Path(ckpt_dir, name))
    start_job, start_epoch = _resume_point(state, epochs, len(jobs))
    finished = dict(state["finished"]) if state else {}
    resumes = [*state.get("resumes", []), [start_job, start_epoch]] if state else []  # where each restart began
    held = list(state.get("report_seconds", [])) if state else []  # each checkpoint's hold-up of the loop
    if state is not None and rank == 0:
        print(f"[{config['name']}] resumed at job {start_job + 1}/{len(jobs)}, epoch {start_epoch}/{epochs}",
              flush=True)
    backbone_dir = None
    if scfg.finetune == "head" and rank == 0:  # one frozen backbone on disk, hard-linked into every student
        backbone_dir = out_root / "backbone"

    for j in range(start_job, len(jobs)):
        job = jobs[j]
        seed, tag = int(job["seed"]), f"student-{job['source']}"
        torch.manual_seed(seed)
        questions = np.asarray(ray.get(job["questions_ref"]), dtype=np.int64)
        targets = np.zeros((train.n_questions, int(config["max_choices"])), dtype=np.float32)
        job_targets = np.asarray(ray.get(job["targets_ref"]), dtype=np.float32)
        targets[questions, : job_targets.shape[1]] = job_targets
        gold = np.asarray(train.answer).copy()
        gold[questions] = np.asarray(ray.get(job["answers_ref"]), dtype=np.int64)
        model = st.build_student(model_path, scfg, max_choices=int(config["max_choices"]),
                                 answer_format=spec.answer_format, tokenizer=tokenizer)
        names = st.set_trainable(model, scfg.finetune, scfg.top_blocks)
        if backbone_dir is not None and not backbone_dir.exists():
            tmp = Path(tempfile.mkdtemp(prefix="backbone.tmp-", dir=out_root))
            model.backbone.save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, backbone_dir)
        first = start_epoch if j == start_job else 0
        resuming = first > 0
        train_seconds = float(state["train_seconds"]) if resuming else 0.0
        history = list(state["history"]) if resuming else []
        best, best_val = None, None
        if resuming:
            current = load_file(str(Path(ckpt_dir) / _MODEL))
            _load_trainable(model, current, names)
            if rank == 0 and Path(ckpt_dir, _BEST).is_file():
                best = load_file(str(Path(ckpt_dir) / _BEST))
            elif rank == 0 and state.get("best_is_current"):  # the best epoch was the checkpoint's own
                best = current
        model = ray.train.torch.prepare_model(model)
        inner = st.unwrap(model)
        optimizer = st.make_optimizer(model, scfg.train_lr, scfg.weight_decay)
        per_worker = -(-len(questions) // world)
        steps_per_epoch = -(-per_worker // scfg.train_batch_size)
        if resuming:
            _load_optimizer(optimizer, load_file(str(Path(ckpt_dir) / _OPTIM)), state["optimizer"])
        # The schedule is placed by epochs done (not restored): `epochs` or the worker count may differ.
        scheduler = st.make_scheduler(optimizer, steps_per_epoch * epochs, start_step=steps_per_epoch * first)

        for epoch in range(first, epochs):
            t0 = time.perf_counter()
            mine = questions[st.shard_questions(len(questions), rank, world, seed=seed, epoch=epoch)]
            batches = st.make_batches(train, targets, mine, scfg.train_batch_size, pad_id, gold=gold,
                                      rng=np.random.default_rng([seed, epoch, rank]), features=feats.get("train"))
            loss = st.train_epoch(model, batches, optimizer, scheduler, device=device, dtype=dtype,
                                  alpha=float(job["alpha"]), **loss_kw)
            if world > 1 and dist.is_available() and dist.is_initialized():
                buf = torch.tensor([loss * len(mine), float(len(mine))], dtype=torch.float64, device=device)
                dist.all_reduce(buf)
                loss = float((buf[0] / buf[1]).cpu())
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            entry = {"epoch": epoch + 1, "train_loss": loss, "seconds": seconds}
            metrics = {"job": j, "epoch": epoch + 1, "train_loss": loss, "start_epoch": first}
            if rank == 0:  # validation picks the epoch that is kept
                val, t1 = splits["validation"], time.perf_counter()
                probs = st.predict(inner, val, batch_size=4 * scfg.train_batch_size, pad_id=pad_id, device=device,
                                   features=feats.get("validation"), dtype=dtype)
                entry |= {"val_acc": accuracy(probs, val.answer), "val_loss": nll(probs, val.answer),
                          "val_seconds": time.perf_counter() - t1}
                history.append(entry)
                if st.best_epoch(history) == epoch + 1:
                    best, best_val = _trainable_state(inner, names), probs
                metrics |= {"val_acc": entry["val_acc"]}
            else:
                history.append(entry)
            last = epoch + 1 == epochs
            if last and rank == 0:  # the job is done: its best epoch is the student
                _load_trainable(inner, best, names)
                keep = st.best_epoch(history)
                test_probs = st.predict(inner, splits["test"], batch_size=4 * scfg.train_batch_size, pad_id=pad_id,
                                        device=device, features=feats.get("test"), dtype=dtype)
                val_probs = best_val if best_val is not None else st.predict(  # a resumed job's best epoch ran before
                    inner, splits["validation"], batch_size=4 * scfg.train_batch_size, pad_id=pad_id, device=device,
                    features=feats.get("validation"), dtype=dtype)
                test_acc = accuracy(test_probs, splits["test"].answer)
                folder = out_root / f"job_{j:03d}"
                shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed attempt
                meta = {**job["meta"], "dtype": dtype, "dtype_why": dtype_why, "best_epoch": keep, "history": history, "test_acc": test_acc,
                        "val_acc": accuracy(val_probs, splits["validation"].answer)}
                sf.save_student(folder, inner, tokenizer, spec, meta, backbone_dir=backbone_dir)
                np.save(folder.parent / f"job_{j:03d}.test_probs.npy", test_probs, allow_pickle=False)
                np.save(folder.parent / f"job_{j:03d}.val_probs.npy", val_probs, allow_pickle=False)
                finished[str(j)] = {"epochs": epoch + 1, "start_epoch": first, "train_seconds": train_seconds,
                                    "history": history, "best_epoch": keep, "test_accuracy": test_acc}
                metrics["test_accuracy"] = test_acc
            if rank == 0 and (not scfg.finetune == "head" or last):
                extra = f" val_acc {entry['val_acc']:.4f}"
                if "test_accuracy" in metrics:
                    extra += f"; kept epoch {finished[str(j)]['best_epoch']}, test_acc {metrics['test_accuracy']:.4f}"
                print(f"[{tag}] job {j + 1}/{len(jobs)} epoch {epoch + 1}/{epochs} loss {loss:.4f} "
                      f"elapsed {train_seconds:.1f}s{extra}", flush=True)
            if (epoch + 1) % every and not last:
                continue
            state = {"job": j, "epoch": epoch + 1, "fingerprint": config["fingerprint"],
                     "train_seconds": train_seconds, "history": history, "finished": finished, "resumes": resumes,
                     "report_seconds": held}
            current = _trainable_state(inner, names) if rank == 0 else None
            # The best epoch is most often the one just trained (and after the last epoch the model holds
            # the best weights): then they are written once.
            state["best_is_current"] = rank == 0 and (last or st.best_epoch(history) == epoch + 1)
            held = [*held, _report(rank, metrics, state, current, None if state["best_is_current"] else best,
                                   optimizer, scheduler,
                                   f"job_{j:03d}_epoch_{epoch + 1:04d}")]
            reported = True
        start_epoch = 0
    if not reported:  # the stored run had finished every job: hand its results on as this run's
        state = {**state, "resumes": resumes}
        _report(rank, {"job": len(jobs) - 1, "epoch": epochs, "start_epoch": epochs}, state,
                _trainable_state(inner, names) if rank == 0 else None, None, optimizer, scheduler, None)
    if ckpt_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _report(rank, metrics, state, current, best, optimizer, scheduler, dir_name) -> float:
    """Write rank 0's checkpoint and report it. Where the run's storage is a local (or shared) folder,
    the files are written straight into it, under a hidden name renamed into place when complete, and
    reported as they are (NO_UPLOAD): nothing is copied a second time. Elsewhere they go to a local
    folder that Ray Train uploads in a background thread (ASYNC). Returns the seconds this worker was
    held up (writing the files, and the report barrier)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    t0 = time.perf_counter()
    storage = ray.train.get_context().get_storage()
    direct = dir_name is not None and type(storage.storage_filesystem).__name__ == "LocalFileSystem"
    checkpoint, mode = None, CheckpointUploadMode.NO_UPLOAD if direct else CheckpointUploadMode.ASYNC
    if rank == 0:
        if direct:
            final = Path(storage.build_checkpoint_path_from_name(dir_name))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dir_name}.tmp-", dir=final.parent))
            _write_checkpoint(tmp, current=current, best=best, optimizer=optimizer, scheduler=scheduler, state=state)
            if final.exists():  # written by an attempt killed before Ray registered it
                shutil.rmtree(final)
            os.replace(tmp, final)
            checkpoint = ray.train.Checkpoint.from_directory(str(final))
        else:
            tmp = tempfile.mkdtemp(prefix="student-ckpt-")
            _write_checkpoint(Path(tmp), current=current, best=best, optimizer=optimizer, scheduler=scheduler,
                              state=state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name, checkpoint_upload_mode=mode)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Head regime: the frozen backbone's pooled features, computed once per split and cached


def _features(model_path: str, student: dict, spec: dict, packed: dict, max_choices: int, pad_id: int) -> np.ndarray:
    import torch

    from engine import student as st

    scfg = _student_config(student)
    torch.set_num_threads(scfg.cpus_per_worker)
    device = "cuda" if scfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = st.build_student(model_path, scfg, max_choices=max_choices, answer_format=spec["answer_format"]).to(device)
    dtype, _ = pick_dtype(scfg.dtype, gpu=device == "cuda")
    return st.pool_features(model, unpack_sequences(packed), batch_size=4 * scfg.train_batch_size, pad_id=pad_id,
                            device=device, dtype=dtype)


def cached_features(student: StudentConfig, model_path: str, spec: dict, packed: dict[str, dict], max_choices: int,
                    pad_id: int, features_dir: str) -> dict[str, np.ndarray]:
    """Pooled features of each split from the frozen backbone: read from `features_dir` when a file of
    the same identity (weights, blocks, pooling, the split's tokens) is there, else computed by one Ray
    task per split and written atomically."""
    import ray

    ident = {"model": model_path, "weights": _weights_stamp(model_path), "revision": student.revision,
             "num_layers": student.num_layers, "pooling": student.pooling, "spec": spec,
             "dtype": pick_dtype(student.dtype, gpu=student.use_gpu)[0]}
    out, todo = {}, {}
    Path(features_dir).mkdir(parents=True, exist_ok=True)
    for role, p in packed.items():
        path = Path(features_dir) / f"{role}-{config_hash({**ident, 'split': _split_digest(p)})}.npy"
        if path.is_file():
            out[role] = np.load(path, allow_pickle=False)
            continue
        task = ray.remote(_features).options(num_cpus=student.cpus_per_worker, num_gpus=1 if student.use_gpu else 0)
        todo[role] = (path, task.remote(model_path, to_dict(student), spec, p, max_choices, pad_id))
    for role, (path, ref) in todo.items():
        arr = ray.get(ref)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
        out[role] = arr
    return out


# ---------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class StudentJob:
    """One student to train: its label source, seed, train questions (indices into the train split),
    their targets (n, C) and the answers its gold loss term may use (n,)."""

    source: str
    seed: int
    questions: np.ndarray
    targets: np.ndarray
    answers: np.ndarray
    meta: dict | None = None
    """Extra fields for the student's `student.json` (label source details, config hash, ...)."""

    def check(self, train: Sequences) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {tuple(SOURCES)}, got {self.source!r}")
        q = np.asarray(self.questions)
        if q.ndim != 1 or len(q) == 0 or q.min() < 0 or q.max() >= train.n_questions:
            raise ValueError(f"questions: expected indices into the {train.n_questions} train questions")
        t = self.targets
        width = int(train.n_choices[q].max())
        if t.ndim != 2 or t.shape[0] != len(q) or t.shape[1] < width:
            raise ValueError(f"targets: expected shape ({len(q)}, >= {width}), got {t.shape}")
        if not np.isfinite(t).all():
            raise ValueError("targets: contains NaN or inf")
        if len(self.answers) != len(q):
            raise ValueError(f"answers: expected {len(q)}, got {len(self.answers)}")


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
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not jobs:
        return []
    missing = [r for r in ROLES if r not in splits]
    if missing:
        raise ValueError(f"splits: missing {missing}")
    for job in jobs:
        job.check(splits["train"])
    if len({s.mode for s in splits.values()}) != 1:
        raise ValueError("splits: every split must be tokenized in the same mode")
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)
    max_choices = max(s.max_choices for s in splits.values())
    packed = {r: pack_sequences(splits[r]) for r in ROLES}
    digests = {r: _split_digest(p) for r, p in packed.items()}
    spec_d = spec.to_dict()
    prints = [_fingerprint(student, j, model_path, digests, spec_d, max_choices, pad_id) for j in jobs]
    # One job may be continued with more epochs; in a run of several, finished jobs would be stale.
    fingerprint = prints[0] if len(jobs) == 1 else config_hash({"jobs": prints, "epochs": student.train_epochs})
    feature_refs = {}
    if student.finetune == "head":
        if features_dir is None:
            raise ValueError("features_dir: student.finetune='head' caches the backbone's features there; pass a folder")
        feats = cached_features(student, model_path, spec_d, packed, max_choices, pad_id, features_dir)
        feature_refs = {r: ray.put(a) for r, a in feats.items()}
    students_dir = Path(storage_dir).absolute() / f"{name}-students"
    students_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {
        "name": name,
        "student": to_dict(student),
        "spec": spec_d,
        "model_path": model_path,
        "max_choices": max_choices,
        "pad_id": int(pad_id),
        "fingerprint": fingerprint,
        "students_dir": str(students_dir),
        "split_refs": {r: ray.put(p) for r, p in packed.items()},
        "feature_refs": feature_refs,
        "jobs": [{"source": j.source, "seed": j.seed, "alpha": loss_alpha(j.source, student.alpha, student.mix_alpha),
                  "meta": {"source": j.source, "seed": j.seed, **(j.meta or {})},
                  "questions_ref": ray.put(np.asarray(j.questions, np.int64)),
                  "targets_ref": ray.put(np.ascontiguousarray(j.targets, dtype=np.float32)),
                  "answers_ref": ray.put(np.asarray(j.answers, np.int64))} for j in jobs],
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
            storage_path=str(Path(storage_dir).absolute()),
            name=name,
            failure_config=FailureConfig(
                max_failures=student.max_failures if max_failures is None else max_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            worker_runtime_env={"env_vars": TRAIN_WORKER_ENV},
        ),
    )
    t0, started = time.perf_counter(), time.time()
    # Ctrl-C must reach the driver as KeyboardInterrupt, as in every other stage, so `distill` prints one
    # line and the same command resumes from the last checkpoint. Ray Train's own SIGINT handler would
    # abort the run and sys.exit() from inside the handler instead (and it stays installed after fit()).
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    result = trainer.fit()
    wall, window = time.perf_counter() - t0, [started, time.time()]
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    out = []
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / _STATE).read_text())
    finished = state["finished"]
    test = splits["test"]
    for j, job in enumerate(jobs):
        folder = students_dir / f"job_{j:03d}"
        if str(j) not in finished or not folder.is_dir():
            raise RuntimeError(f"{name}: job {j} ({job.source}, seed {job.seed}) has no result")
        probs = np.load(students_dir / f"job_{j:03d}.test_probs.npy", allow_pickle=False)
        done = finished[str(j)]
        out.append({"source": job.source, "seed": job.seed, "test_accuracy": float((probs.argmax(-1) == test.answer).mean()),
                    "test_probs": probs, "val_probs": np.load(students_dir / f"job_{j:03d}.val_probs.npy"),
                    "student_dir": str(folder), "best_epoch": int(done["best_epoch"]),
                    "train_seconds": float(done["train_seconds"]), "epochs": int(done["epochs"]),
                    "history": done["history"], "start_epoch": int(done["start_epoch"]), "wall_seconds": wall,
                    "fit_window": window,
                    "checkpoint_path": result.checkpoint.path, "resumes": state.get("resumes", []),
                    "report_seconds": state.get("report_seconds", [])})
    return out


def train_student(student: StudentConfig, job: StudentJob, **kw) -> dict[str, Any]:
    """One student: `train_students` with one job, run under the name `student-<source>`."""
    return train_students(student, [job], name=kw.pop("name", f"student-{job.source}"), **kw)[0]
