"""Teacher extraction on Ray: a placement group of teacher replicas writing whole Zarr chunks.

The driver lays out (or resumes) `<store>.partial` and hands chunks of rows to replicas from one queue,
so faster replicas take more. Each replica keeps two chunks in flight: while one runs the forward, the
other is being shipped in or written out. A replica writes its own chunks; the driver alone marks a
chunk done, after the write returned. A chunk whose replica dies is queued again and the replica is
replaced in the same placement-group bundle. A chunk is written whole by one owner and only marked
done after, so a death mid-chunk loses no row and a retry duplicates none.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import runtime
from engine import store
from engine.config import Config, ConfigError, ExtractConfig, config_hash, store_identity, to_dict
from engine.log import WARNING, Progress, log, progress
from engine.sequences import Sequences
from engine.teacher import ForwardOut, forward_rows

PIPELINE_DEPTH = 2
"""Chunks in flight per replica: one in the forward, the next arriving or the last being written."""
PLACEMENT_TIMEOUT_S = 600


class TeacherActor:
    """Hosts one teacher replica (transformers) and writes the chunks it is given."""

    def __init__(self, model_path: str, cfg: Config, layers: list[int], pad_id: int, replica: int) -> None:
        import torch

        from engine.decoder import attach
        from engine.models import load_causal_lm
        from engine.packed import pack_linears

        e, t = cfg.extract, cfg.teacher
        torch.set_num_threads(e.cpus_per_replica)
        device_map, device = teacher_devices(e.gpus_per_replica, torch.cuda.is_available())
        self.model = load_causal_lm(model_path, t.dtype, trust_remote_code=t.trust_remote_code, revision=t.revision,
                                    device_map=device_map)
        if device:
            self.model = self.model.to(device)
        on_cpu = device_map is None and device is None
        packed = pack_linears(self.model) if on_cpu else 0  # CPU: weights laid out once
        decoder = attach(self.model)  # CPU 16-bit Llama-layout blocks: over unpadded tokens; else why not
        self.layers, self.pad_id, self.cfg = layers, pad_id, cfg
        self.forward_lock = threading.Lock()
        ctx = ray.get_runtime_context()
        self.where = {"replica": replica, "node": ctx.get_node_id(), "pid": os.getpid(),
                      "gpus": [str(g) for g in ray.get_gpu_ids()],
                      "malloc": runtime.malloc_settings(), "attention": self.model.config._attn_implementation,
                      "packed_linears": packed, "decoder": decoder}

    def info(self) -> dict:
        return self.where

    def forward(self, seqs: Sequences, scores: bool | None = None) -> ForwardOut:
        """States of `self.layers` for every row, with teacher scores if `scores` (None: the config's)."""
        scores = self.cfg.extract.teacher_scores if scores is None else scores
        with self.forward_lock:  # one forward at a time; shipping and writing other chunks overlap it
            return forward_rows(
                self.model, seqs, np.arange(seqs.n_rows), self.layers, pool=self.cfg.prompt.pool,
                pad_id=self.pad_id, batch_size=self.cfg.extract.batch_size, scores=scores,
            )

    def write(self, part: str, split: str, chunk: int, out: ForwardOut) -> None:
        store.write_chunk(part, split, chunk, out.states, out.scores)

    def run(self, part: str, split: str, chunk: int, seqs: Sequences) -> dict:
        t0 = time.perf_counter()
        out = self.forward(seqs)
        self.write(part, split, chunk, out)
        return {"tokens": out.tokens, "seconds": time.perf_counter() - t0, "replica": self.where["replica"]}


def teacher_devices(gpus_per_replica: float, cuda: bool) -> tuple[str | None, str | None]:
    """(device_map, device) for a replica: the teacher split over its GPUs when it has more than one
    (Ray sets CUDA_VISIBLE_DEVICES to them), moved to its GPU when it has one, else left on the CPU."""
    if not cuda or gpus_per_replica <= 0:
        return None, None
    return ("auto", None) if gpus_per_replica > 1 else (None, "cuda")


def replica_env(gpus_per_replica: float) -> dict[str, str]:
    """The environment a teacher replica's process starts with: it runs its forwards in the actor's own
    threads (`max_concurrency`), so one malloc arena, and on CPU the freed memory kept
    (`cluster.runtime.compute_env`)."""
    return runtime.compute_env(bool(gpus_per_replica))


def replica_bundles(e: ExtractConfig) -> list[dict[str, float]]:
    """One placement-group bundle per replica: the CPUs and GPUs it reserves, all on one node."""
    bundle = {"CPU": float(e.cpus_per_replica)}
    if e.gpus_per_replica:
        bundle["GPU"] = float(e.gpus_per_replica)
    return [dict(bundle) for _ in range(e.replicas)]


def check_fits(bundles: list[dict[str, float]], total: dict[str, float], strategy: str) -> None:
    """Refuse at once a pool the cluster could never hold, naming the fields to change."""
    for res in ("CPU", "GPU"):
        need = sum(b.get(res, 0.0) for b in bundles)
        if need > total.get(res, 0.0):
            field_ = "cpus_per_replica" if res == "CPU" else "gpus_per_replica"
            raise ConfigError(
                f"extract.replicas x extract.{field_}: the pool needs {need:g} {res}s, the cluster has "
                f"{total.get(res, 0.0):g}; lower one of them (placement {strategy})"
            )


@dataclass
class ReplicaPool:
    """Teacher replicas in one placement group; a dead replica is replaced in its own bundle."""

    cfg: Config
    args: tuple
    actor_cls: type
    actors: list = field(default_factory=list)
    replaced: int = 0

    def __post_init__(self) -> None:
        e = self.cfg.extract
        bundles = replica_bundles(e)
        check_fits(bundles, ray.cluster_resources(), e.placement)
        self.pg = placement_group(bundles, strategy=e.placement)
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.pg)
            raise ConfigError(f"extract.placement: {e.replicas} replicas of {bundles[0]} could not be placed "
                              f"({e.placement}) within {PLACEMENT_TIMEOUT_S}s; free resources or lower extract.replicas")
        self.actors = [self._start(i) for i in range(e.replicas)]

    def _start(self, i: int):
        e = self.cfg.extract
        return (
            ray.remote(self.actor_cls)
            .options(num_cpus=e.cpus_per_replica, num_gpus=e.gpus_per_replica, max_restarts=0,
                     max_concurrency=PIPELINE_DEPTH, runtime_env={"env_vars": replica_env(e.gpus_per_replica)},
                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(*self.args, i)
        )

    def replace(self, i: int) -> None:
        ray.kill(self.actors[i])
        self.actors[i] = self._start(i)
        self.replaced += 1

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def store_meta(cfg: Config, model_path: str, layers: list[int], n_model_layers: int, hidden: int) -> dict:
    versions = {p: md.version(p) for p in ("torch", "transformers", "zarr", "ray")}
    return {
        "config": to_dict(cfg), "config_hash": config_hash(cfg), "model_path": model_path,
        "layers": layers, "n_model_layers": n_model_layers, "hidden_size": hidden,
        "mode": cfg.prompt.mode, "pool": cfg.prompt.pool, "versions": versions,
    }


def run_extraction(
    cfg: Config, model_path: str, splits: dict[str, tuple[Sequences, list[str]]], layers: list[int],
    n_model_layers: int, hidden: int, pad_id: int, *, actor_cls: type | None = None, dtype_why: str | None = None,
) -> Path:
    """Build (or resume, or reuse) the activation store for all splits. Returns its committed path.
    `dtype_why`: why the teacher runs in `teacher.dtype` (recorded in the store)."""
    path = Path(cfg.out_dir) / "activations.zarr"
    identity = store_identity(cfg)
    if path.exists():
        store.open_store(path, identity)  # raises, naming the field, if made under another config
        log("extract", f"reusing {path}")
        return path
    layout = {name: (s, ids, len(layers), hidden) for name, (s, ids) in splits.items()}
    meta = store_meta(cfg, model_path, layers, n_model_layers, hidden)
    meta["teacher_dtype"] = {"dtype": cfg.teacher.dtype, "why": dtype_why or "set in the config"}
    part = str(store.create_or_resume(path, identity, meta, layout, scores=cfg.extract.teacher_scores))
    size = {name: store.chunk_size(s.n_rows, cfg.extract.chunk_rows) for name, (s, _) in splits.items()}

    def work(name: str, c: int) -> Sequences:
        lo, hi = store.chunk_bounds(c, splits[name][0].n_rows, size[name])
        return splits[name][0].rows_view(lo, hi)

    queue = deque((name, c) for name in splits for c in store.pending_chunks(store.done_mask(part, name)))
    total_rows = sum(s.n_rows for s, _ in splits.values())
    todo_rows = sum(work(n, c).n_rows for n, c in queue)
    e = cfg.extract
    log("extract", f"{len(queue)} chunks ({todo_rows}/{total_rows} rows) to do on {e.replicas} replica(s) "
          f"({e.placement}); layers {layers[0]}..{layers[-1]} ({len(layers)}), "
          f"teacher scores {'on' if e.teacher_scores else 'off'}")
    t0 = time.perf_counter()
    pool = ReplicaPool(cfg, (model_path, cfg, layers, pad_id), actor_cls or TeacherActor)
    try:
        with progress("extract", len(queue), "chunk") as bar:
            drained = _drain(pool, queue, part, work, todo_rows, e.max_chunk_retries, t0, bar)
        drained["replicas"] = ray.get([a.info.remote() for a in pool.actors])
        drained["replaced"] = pool.replaced
    finally:
        pool.close()
    drained["seconds"] = round(time.perf_counter() - t0, 1)
    root_attrs = store.open_store(part, allow_incomplete=True).attrs
    store.set_attr(part, "extract_log", [*root_attrs.get("extract_log", []), drained])
    store.set_attr(part, "extract_seconds", drained["seconds"])
    final = store.commit(path)
    log("extract", f"committed {final}")
    return final


def _drain(pool: ReplicaPool, queue: deque, part: str, work, todo_rows: int, max_retries: int, t0: float,
           bar: Progress | None = None) -> dict:
    """Hand chunks out until every one is done; requeue the chunks of a replica that died.
    `work(split, chunk)` gives a chunk's rows; `bar` counts the chunks done (a line each without it)."""
    bar = bar or Progress(None)
    inflight: dict = {}
    retries: dict = {}
    chunks: list = []
    done_rows = done_tokens = 0

    def fill(i: int) -> None:
        actor = pool.actors[i]
        while queue and sum(1 for v in inflight.values() if v[1] is actor) < PIPELINE_DEPTH:
            name, c = queue.popleft()
            rows = work(name, c)
            inflight[actor.run.remote(part, name, c, rows)] = (i, actor, name, c, rows.n_rows)

    for i in range(len(pool.actors)):
        fill(i)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        i, actor, name, c, n = inflight.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            retries[(name, c)] = retries.get((name, c), 0) + 1
            if retries[(name, c)] > max_retries:
                raise RuntimeError(f"[extract] chunk {c} of {name} failed {retries[(name, c)]} times "
                                   f"(extract.max_chunk_retries={max_retries}): {err}") from err
            queue.appendleft((name, c))
            if pool.actors[i] is actor:  # the first of its chunks to report the death
                log("extract", f"replica {i} died on {name} chunk {c}; chunk requeued, replica replaced", WARNING)
                pool.replace(i)
            fill(i)
            continue
        store.mark_done(part, name, c)
        chunks.append([name, c, res["replica"], retries.get((name, c), 0)])
        done_rows, done_tokens = done_rows + n, done_tokens + res["tokens"]
        el = time.perf_counter() - t0
        log("extract", f"{name} chunk {c} done by replica {res['replica']} | {done_rows}/{todo_rows} rows | "
              f"{done_tokens / el:.0f} tok/s | {el:.0f}s elapsed, ~{el / done_rows * (todo_rows - done_rows):.0f}s left",
            bar.line_level)
        bar.update(1, rows=f"{done_rows}/{todo_rows}", rows_s=f"{done_rows / el:.1f}", tok_s=f"{done_tokens / el:.0f}")
        fill(i)
    return {"chunks": chunks, "tokens": done_tokens, "retries": sum(retries.values())}
