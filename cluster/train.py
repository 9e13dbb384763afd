"""Ray Train (V2) around `engine.student`: one TorchTrainer run per label source.

`train_student` ships the token rows and the target matrix to the workers through the object store,
trains with DDP (gloo on CPU, NCCL on GPU, both set up by TorchTrainer), checkpoints every epoch and,
after the last epoch, has rank 0 predict the test split. The test probabilities come back to the
driver inside the final checkpoint as `test_probs.npy`.

Checkpoints hold no pickles: weights and optimizer tensors are safetensors, everything else JSON/NPY.

Resume: Ray Train V2 keeps a checkpoint-manager snapshot under `<storage_dir>/student-<source>/`. A new
`train_student` call with the same `storage_dir` and source picks that up, so `ray.train.get_checkpoint()`
returns the latest checkpoint even when the earlier run had completed; the loop then starts at the
next epoch (a run asked for more epochs continues; one already done only re-predicts). A checkpoint
made under other settings (data, targets, model, hyper-parameters other than `epochs` and the
worker resources) is refused: use a fresh `storage_dir` per experiment. On a multi-node cluster
`storage_dir` must be shared storage (NFS or a cloud URI Ray Train understands).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
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
# The per-worker loop


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, load_model

    from engine import student as st

    scfg = StudentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config["student"].items()})
    seed, source = int(config["seed"]), config["source"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(scfg.cpus_per_worker)
    torch.manual_seed(seed)
    device = ray.train.torch.get_device()

    train = unpack_sequences(ray.get(config["train_ref"]))
    targets = np.asarray(ray.get(config["targets_ref"]), dtype=np.float32)
    test = unpack_sequences(ray.get(config["test_ref"])) if rank == 0 else None
    pad_id, max_length = int(config["pad_id"]), scfg.max_length
    loss_kw = dict(soft=scfg.soft, temperature=scfg.temperature, alpha=scfg.alpha)

    model = st.StudentModel.from_pretrained(
        config["model_path"], mode=train.mode, max_choices=int(config["max_choices"]), num_layers=scfg.num_layers
    )
    start_epoch, train_seconds, history = 0, 0.0, []
    ckpt = ray.train.get_checkpoint()
    resume_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume_state = json.loads((Path(d) / _STATE).read_text())
            if resume_state.get("fingerprint") != config["fingerprint"]:
                raise ValueError(
                    f"student-{source}: the checkpoint under the run's storage was made with other data or "
                    "settings; pass a fresh storage_dir for a new experiment"
                )
            load_model(model, str(Path(d) / _MODEL), device="cpu")
            start_epoch = int(resume_state["epoch"])
            train_seconds = float(resume_state.get("train_seconds", 0.0))
            history = list(resume_state.get("history", []))
            optim_tensors = load_file(str(Path(d) / _OPTIM))

    model = ray.train.torch.prepare_model(model)
    inner = st.unwrap(model)
    optimizer = st.make_optimizer(model, scfg.lr, scfg.weight_decay)
    per_worker = -(-train.n_questions // world)
    steps_per_epoch = -(-per_worker // scfg.batch_size)
    if resume_state is not None:
        _load_optimizer(optimizer, optim_tensors, resume_state["optimizer"])
    # The schedule is placed by epochs done (not restored): `epochs` or the worker count may differ.
    scheduler = st.make_scheduler(optimizer, steps_per_epoch * scfg.epochs, start_step=steps_per_epoch * start_epoch)
    if resume_state is not None:
        if rank == 0:
            print(f"[student-{source}] resumed after epoch {start_epoch}/{scfg.epochs}", flush=True)

    def report(epoch: int, metrics: dict, probs: np.ndarray | None, dir_name: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = {
                    "epoch": epoch,
                    "fingerprint": config["fingerprint"],
                    "train_seconds": train_seconds,
                    "history": history,
                    "source": source,
                }
                _write_checkpoint(
                    Path(tmp), model=inner, optimizer=optimizer, scheduler=scheduler, state=state, probs=probs
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)

    def test_probs() -> tuple[np.ndarray | None, float | None]:
        if rank != 0:
            return None, None
        probs = st.predict(inner, test, batch_size=scfg.batch_size, pad_id=pad_id, max_length=max_length, device=device)
        return probs, st.accuracy(probs, test.answer)

    for epoch in range(start_epoch, scfg.epochs):
        t0 = time.perf_counter()
        questions = st.shard_questions(train.n_questions, rank, world, seed=seed, epoch=epoch)
        batches = st.make_batches(
            train,
            targets,
            questions,
            scfg.batch_size,
            pad_id,
            max_length,
            rng=np.random.default_rng([seed, epoch, rank]),
        )
        loss = st.train_epoch(model, batches, optimizer, scheduler, device=device, **loss_kw)
        if world > 1 and dist.is_available() and dist.is_initialized():
            buf = torch.tensor([loss * len(questions), float(len(questions))], dtype=torch.float64, device=device)
            dist.all_reduce(buf)
            loss = float((buf[0] / buf[1]).cpu())
        train_seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss})
        last = epoch + 1 == scfg.epochs
        probs, acc = test_probs() if last else (None, None)
        metrics = {"epoch": epoch + 1, "train_loss": loss, "start_epoch": start_epoch, "train_seconds": train_seconds}
        if acc is not None:
            metrics["test_accuracy"] = acc
        if rank == 0:
            extra = f" test_acc {acc:.4f}" if acc is not None else ""
            print(
                f"[student-{source}] epoch {epoch + 1}/{scfg.epochs} loss {loss:.4f} "
                f"elapsed {train_seconds:.1f}s{extra}",
                flush=True,
            )
        report(epoch + 1, metrics, probs, f"epoch_{epoch + 1:04d}")

    if start_epoch >= scfg.epochs:  # the stored run already did every epoch: predict again only
        probs, acc = test_probs()
        metrics = {
            "epoch": start_epoch,
            "train_loss": history[-1]["train_loss"] if history else float("nan"),
            "start_epoch": start_epoch,
            "train_seconds": train_seconds,
        }
        if acc is not None:
            metrics["test_accuracy"] = acc
        report(start_epoch, metrics, probs, None)


# ---------------------------------------------------------------------------------------------
# Driver side


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
    """Train one student on `targets` (Q_train, C) and score it on `test`.

    Returns {"source", "test_accuracy", "test_probs" (Q_test, test.max_choices), "train_seconds",
    "epochs", "wall_seconds", "history"}. Uses the Ray cluster already initialised (or starts one).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.student import resolve_student_path

    if source not in LABEL_SOURCES:
        raise ValueError(f"source: must be one of {LABEL_SOURCES}, got {source!r}")
    if train.mode != test.mode:
        raise ValueError(f"train rows are {train.mode!r} but test rows are {test.mode!r}")
    targets = np.ascontiguousarray(targets, dtype=np.float32)
    if targets.ndim != 2 or targets.shape[0] != train.n_questions or targets.shape[1] < train.max_choices:
        raise ValueError(f"targets: expected shape ({train.n_questions}, >= {train.max_choices}), got {targets.shape}")
    if not np.isfinite(targets).all():
        raise ValueError("targets: contains NaN or inf")
    scfg = cfg.student
    model_path = resolve_student_path(scfg, model_dir)
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)
    max_choices = max(train.max_choices, test.max_choices)
    packed_train = pack_sequences(train)
    fingerprint = _fingerprint(scfg, cfg.seed, source, model_path, packed_train, targets, max_choices, pad_id)

    loop_config = {
        "student": to_dict(scfg),
        "seed": cfg.seed,
        "source": source,
        "model_path": model_path,
        "max_choices": max_choices,
        "pad_id": int(pad_id),
        "fingerprint": fingerprint,
        "train_ref": ray.put(packed_train),
        "targets_ref": ray.put(targets),
        "test_ref": ray.put(pack_sequences(test)),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scfg.num_workers,
            use_gpu=scfg.use_gpu,
            resources_per_worker={"CPU": scfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=os.path.abspath(storage_dir),
            name=f"student-{source}",
            failure_config=FailureConfig(max_failures=cfg.student.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"student-{source}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / _STATE).read_text())
        probs = np.load(Path(d) / _PROBS, allow_pickle=False)
    acc = float((probs.argmax(-1) == test.answer).mean()) if test.n_questions else float("nan")
    return {
        "source": source,
        "test_accuracy": acc,
        "test_probs": probs,
        "train_seconds": float(state["train_seconds"]),
        "epochs": int(state["epoch"]),
        "wall_seconds": wall,
        "history": state.get("history", []),
        "checkpoint_path": result.checkpoint.path,
        "start_epoch": int(result.metrics.get("start_epoch", 0)) if result.metrics else 0,
    }
