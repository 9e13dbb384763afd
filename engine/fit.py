"""The student's training recipe, apart from where it runs: one job's epochs, the best epoch chosen on
validation, the checkpoint files and where a resumed run starts.

A *job* is one student: a label source, a seed, the train questions it may use and their targets. It
trains from fresh pretrained weights; after every epoch rank 0 scores the validation split, and the
epoch with the best validation accuracy (then loss: `engine.student.best_epoch`) is the student that is
kept (`finish_job` puts it back and scores validation and test). Test never enters the choice.

Both places that train students run these functions: the Ray Train worker loop (`cluster/train.py`,
which adds the worker group, DDP's loss reduction and `ray.train.report` around them) and the plain
in-process loop that `bench/student.py` times against it. Checkpoints hold no pickles: trainable weights
and optimizer tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from engine import student as st
from engine.config import StudentConfig, config_hash
from engine.identity import deciding_fields
from engine.labels import SOURCES
from engine.metrics import accuracy, nll
from engine.sequences import Sequences

if TYPE_CHECKING:
    import torch

CKPT_MODEL = "trainable.safetensors"
CKPT_BEST = "best.safetensors"
CKPT_OPTIM = "optimizer.safetensors"
CKPT_STATE = "state.json"


# ---------------------------------------------------------------------------------------------
# What a job is, and what a resumed run must share with its checkpoint


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


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(student: StudentConfig, job: StudentJob, model_path: str, splits: dict[str, str], spec: dict,
                max_choices: int, pad_id: int) -> str:
    """What a resumed run must share with the checkpoint it resumes: the student fields that decide what
    it learns (`engine.identity`), but `epochs` (a single job may be continued with more), and the job's
    data. `splits`: a digest of each split's tokens."""
    s = {k: getattr(student, k) for k in deciding_fields(StudentConfig, "student") if k not in ("epochs", "head_epochs")}
    if s.get("template") is None:  # added later; the spec carries it when set
        s.pop("template", None)
    return config_hash({
        "student": s, "seed": job.seed, "source": job.source, "model": model_path, "spec": spec,
        "max_choices": max_choices, "pad_id": pad_id, "splits": splits,
        "job": digest(job.questions, np.asarray(job.targets, np.float32), job.answers), "format": 3,
    })


def run_fingerprint(prints: list[str], epochs: int) -> str:
    """A run's fingerprint from its jobs': one job may be continued with more epochs; in a run of
    several, finished jobs would be stale, so `epochs` enters."""
    return prints[0] if len(prints) == 1 else config_hash({"jobs": prints, "epochs": epochs})


def resume_point(state: dict | None, epochs: int, n_jobs: int) -> tuple[int, int]:
    """(job, epoch) to start at, given the latest checkpoint's state: its job continues while it has
    epochs left (a single-job run asked for more epochs continues), else the next job starts."""
    if state is None:
        return 0, 0
    job, epoch = int(state["job"]), int(state["epoch"])
    if epoch < epochs or job + 1 >= n_jobs:
        return job, epoch
    return job + 1, 0


# ---------------------------------------------------------------------------------------------
# Checkpoint files (safetensors + JSON)


def trainable_state(model, names: list[str]) -> dict:
    sd = model.state_dict()
    return {n: sd[n].detach().cpu().clone().contiguous() for n in names}


def load_trainable(model, tensors: dict, names: list[str]) -> None:
    if sorted(tensors) != sorted(names):
        raise ValueError("the checkpoint's trainable weights do not match the student's; use a fresh storage_dir")
    model.load_state_dict(tensors, strict=False)


def _used_rows(t) -> Optional[torch.Tensor]:
    """Indices of the rows of a 2-D-or-more state tensor that are not all zero, when at most half of its
    rows are used (else None). An embedding's Adam moments stay exactly zero on the rows of tokens the
    training never saw, most of a vocabulary: those rows need not be written."""
    if t.ndim < 2 or t.shape[0] < 64:
        return None
    used = t.reshape(t.shape[0], -1).ne(0).any(1)
    return used.nonzero().squeeze(1) if int(used.sum()) <= t.shape[0] // 2 else None


def optimizer_state(optimizer) -> tuple[dict, dict]:
    """(tensors, the JSON-able rest) of an optimizer's state. A state tensor whose rows are mostly
    exactly zero (`_used_rows`) is stored as its used rows and their indices (`<key>.rows`), and its
    shape under the entry's "rows"; `load_optimizer` puts the zeros back, so the state is restored bit
    for bit. For the default student that leaves out most of the word embedding's two moments."""
    import torch

    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, entry_in in sd["state"].items():
        entry = {"tensors": [], "values": {}, "rows": {}}
        for k, v in entry_in.items():
            if torch.is_tensor(v):
                t = v.detach().cpu().contiguous()
                rows = _used_rows(t)
                if rows is not None:
                    tensors[f"{pid}.{k}.rows"] = rows
                    entry["rows"][k] = list(t.shape)
                    t = t[rows].contiguous()
                tensors[f"{pid}.{k}"] = t
                entry["tensors"].append(k)
            else:
                entry["values"][k] = v
        state[str(pid)] = entry
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer(optimizer, saved: tuple[dict, dict]) -> None:
    """Restore `optimizer_state`'s pair."""
    import torch

    tensors, meta = saved
    state = {}
    for pid, entry in meta["state"].items():
        s = {}
        for k in entry["tensors"]:
            t = tensors[f"{pid}.{k}"]
            if k in entry.get("rows", {}):  # the used rows only: the others were exactly zero
                full = torch.zeros(entry["rows"][k], dtype=t.dtype)
                full[tensors[f"{pid}.{k}.rows"]] = t
                t = full
            s[k] = t
        s.update(entry["values"])
        state[int(pid)] = s
    # How the update runs (fused kernel, foreach loop) is this optimizer's own, not part of the saved state.
    impl = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**saved_g, **{k: g[k] for k in impl if k in g}}
              for saved_g, g in zip(meta["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def write_checkpoint(d: Path, *, current: dict, best: dict | None, optimizer: tuple[dict, dict], schedule_step: int,
                     state: dict) -> None:
    """The trainable weights (and the best epoch's, unless they are the current ones), the optimizer
    (`optimizer_state`'s pair) and `state` (JSON: where the run stands) into folder `d`."""
    from engine.tensorfile import write_safetensors  # past the page cache: the loop waits on these writes

    write_safetensors(current, d / CKPT_MODEL)
    if best is not None:
        write_safetensors(best, d / CKPT_BEST)
    write_safetensors(optimizer[0], d / CKPT_OPTIM)
    (d / CKPT_STATE).write_text(json.dumps(dict(state, optimizer=optimizer[1], schedule_step=schedule_step)))


@dataclass
class Checkpoint:
    """A checkpoint read back into memory: its state and tensors."""

    state: dict
    current: dict
    best: Optional[dict]
    optimizer_tensors: dict

    @property
    def optimizer(self) -> tuple[dict, dict]:
        return self.optimizer_tensors, self.state["optimizer"]


def read_checkpoint(d: str | Path, *, best: bool = True) -> Checkpoint:
    """Read folder `d` written by `write_checkpoint`; the best weights only when `best` (rank 0)."""
    from safetensors.torch import load_file

    d = Path(d)
    state = json.loads((d / CKPT_STATE).read_text())
    current = load_file(str(d / CKPT_MODEL))
    kept = None
    if best and (d / CKPT_BEST).is_file():
        kept = load_file(str(d / CKPT_BEST))
    elif best and state.get("best_is_current"):  # the best epoch was the checkpoint's own
        kept = current
    return Checkpoint(state, current, kept, load_file(str(d / CKPT_OPTIM)))


# ---------------------------------------------------------------------------------------------
# One job's epochs


@dataclass
class Worker:
    """Where the loop runs: this worker's rank among `world` (rank 0 validates and keeps the best
    epoch), its device and compute dtype, and how a loss is averaged over workers (None: one worker)."""

    rank: int = 0
    world: int = 1
    device: object = "cpu"
    dtype: str = "float32"
    all_reduce: Optional[Callable[[float, int], float]] = None


@dataclass
class JobProgress:
    """Where a job's training stands; a resumed job starts from its checkpoint's."""

    first_epoch: int = 0
    history: list = field(default_factory=list)
    """Per epoch: epoch, train_loss, seconds, the training's CPU seconds (user, system) and page faults
    (`cpu_spent`); on rank 0 also val_acc, val_loss, val_seconds."""
    train_seconds: float = 0.0
    best: Optional[dict] = None
    """Rank 0: the best epoch's trainable weights."""
    best_val: Optional[np.ndarray] = None
    """Their validation probabilities (None when that epoch ran before a resume)."""

    @classmethod
    def resumed(cls, ckpt: Checkpoint, first_epoch: int) -> JobProgress:
        s = ckpt.state
        return cls(first_epoch, list(s["history"]), float(s["train_seconds"]), ckpt.best)


def job_targets(job_questions, job_targets_, job_answers, train: Sequences, max_choices: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(questions, targets over every train question (Q, max_choices), gold over every train question):
    the job's rows placed in the split's layout, so batches index them by question."""
    questions = np.asarray(job_questions, dtype=np.int64)
    targets = np.zeros((train.n_questions, max_choices), dtype=np.float32)
    t = np.asarray(job_targets_, dtype=np.float32)
    targets[questions, : t.shape[1]] = t
    gold = np.asarray(train.answer).copy()
    gold[questions] = np.asarray(job_answers, dtype=np.int64)
    return questions, targets, gold


def cpu_now() -> tuple[float, float, int]:
    """This process's CPU seconds in user and kernel mode and its minor page faults so far (all its
    threads: under Ray Train that includes Ray's own). Zeros where `resource` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0, 0.0, 0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def cpu_spent(since: tuple[float, float, int]) -> dict:
    """The epoch's entries for CPU time and page faults since `cpu_now()` gave `since`, and the peak
    resident memory so far. Wall time an epoch spends beyond its CPU seconds per thread is waiting;
    kernel seconds that swing with page faults are the machine's memory (on a VM, host memory backing
    first-touched pages)."""
    u, s_, f = cpu_now()
    return {"cpu_user_seconds": round(u - since[0], 3), "cpu_system_seconds": round(s_ - since[1], 3),
            "page_faults": int(f - since[2]), "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """The most memory this process has held resident so far, in MiB (0 where `resource` is missing):
    with `page_faults`, how much memory an epoch touched for the first time."""
    try:
        import resource
    except ImportError:
        return 0.0
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def steps_per_epoch(n_questions: int, world: int, batch_size: int) -> int:
    """Optimizer steps per epoch on each worker: its shard of the questions in batches."""
    per_worker = -(-n_questions // world)
    return -(-per_worker // batch_size)


def predict_split(model, seqs: Sequences, scfg: StudentConfig, pad_id: int, worker: Worker,
                  features: Optional[np.ndarray] = None) -> np.ndarray:
    return st.predict(model, seqs, batch_size=4 * scfg.train_batch_size, pad_id=pad_id, device=worker.device,
                      features=features, dtype=worker.dtype)


def fit_job(model, names: list[str], splits: dict[str, Sequences], job: tuple[np.ndarray, np.ndarray, np.ndarray],
            *, scfg: StudentConfig, seed: int, alpha: float, epochs: int, pad_id: int, optimizer, scheduler,
            worker: Worker, progress: JobProgress, features: Optional[dict] = None,
            on_epoch: Optional[Callable[[int, dict], None]] = None) -> JobProgress:
    """Train epochs `progress.first_epoch + 1 .. epochs` of one job (`job`: `job_targets`'s triple) and
    return where it stands. Each worker trains on its shard of the job's questions, reshuffled every
    epoch; rank 0 then scores validation and keeps the best epoch's weights. `on_epoch(epoch, entry)`
    runs after each epoch on every worker (printing, checkpoints)."""
    questions, targets, gold = job
    features = features or {}
    inner = st.unwrap(model)
    for epoch in range(progress.first_epoch, epochs):
        t0, cpu0 = time.perf_counter(), cpu_now()
        mine = questions[st.shard_questions(len(questions), worker.rank, worker.world, seed=seed, epoch=epoch)]
        batches = st.make_batches(splits["train"], targets, mine, scfg.train_batch_size, pad_id, gold=gold,
                                  rng=np.random.default_rng([seed, epoch, worker.rank]), features=features.get("train"))
        loss = st.train_epoch(model, batches, optimizer, scheduler, device=worker.device, dtype=worker.dtype,
                              alpha=alpha, soft=scfg.soft, temperature=scfg.temperature)
        if worker.all_reduce is not None:
            loss = worker.all_reduce(loss, len(mine))
        seconds = time.perf_counter() - t0
        progress.train_seconds += seconds
        entry = {"epoch": epoch + 1, "train_loss": loss, "seconds": seconds} | cpu_spent(cpu0)
        probs = None
        if worker.rank == 0:  # validation picks the epoch that is kept
            t1 = time.perf_counter()
            probs = predict_split(inner, splits["validation"], scfg, pad_id, worker, features.get("validation"))
            entry |= {"val_acc": accuracy(probs, splits["validation"].answer),
                      "val_loss": nll(probs, splits["validation"].answer), "val_seconds": time.perf_counter() - t1}
        progress.history.append(entry)
        if probs is not None and st.best_epoch(progress.history) == epoch + 1:
            progress.best, progress.best_val = trainable_state(inner, names), probs
        if on_epoch is not None:
            on_epoch(epoch + 1, entry)
    return progress


@dataclass
class Finished:
    """A job's student: the epoch kept, and its validation and test probabilities."""

    best_epoch: int
    val_probs: np.ndarray
    test_probs: np.ndarray

    def metrics(self, splits: dict[str, Sequences]) -> dict:
        return {"best_epoch": self.best_epoch, "test_acc": accuracy(self.test_probs, splits["test"].answer),
                "val_acc": accuracy(self.val_probs, splits["validation"].answer)}


def finish_job(model, names: list[str], splits: dict[str, Sequences], progress: JobProgress, *,
               scfg: StudentConfig, pad_id: int, worker: Worker, features: Optional[dict] = None) -> Finished:
    """Rank 0, after a job's last epoch: put its best epoch's weights back and score test (and
    validation, when that epoch ran before a resume)."""
    features = features or {}
    inner = st.unwrap(model)
    load_trainable(inner, progress.best, names)
    test = predict_split(inner, splits["test"], scfg, pad_id, worker, features.get("test"))
    val = progress.best_val
    if val is None:
        val = predict_split(inner, splits["validation"], scfg, pad_id, worker, features.get("validation"))
    return Finished(st.best_epoch(progress.history), val, test)
