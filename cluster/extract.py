"""Teacher extraction on Ray: a pool of teacher actors writing whole Zarr chunks.

The driver tokenizes, lays out (or resumes) `<store>.partial`, and hands chunks of rows to actors
from a queue, so faster replicas take more. An actor runs the forward and writes its chunk; the
driver alone marks chunks done. A chunk whose actor dies is queued again on a fresh actor; since a
chunk is written whole by one owner and only marked done after, no row is lost or counted twice.
"""

from __future__ import annotations

import importlib.metadata as md
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray

from engine import store
from engine.config import Config, config_hash, store_identity, to_dict
from engine.sequences import Sequences
from engine.teacher import forward_rows

MAX_CHUNK_RETRIES = 3


class TeacherActor:
    """Hosts one teacher replica (transformers) and writes the chunks it is given."""

    def __init__(self, model_path: str, cfg: Config, layers: list[int], pad_id: int) -> None:
        import torch

        from engine.models import load_causal_lm

        torch.set_num_threads(cfg.extract.cpus_per_replica)
        t = cfg.teacher
        self.model = load_causal_lm(model_path, t.dtype, trust_remote_code=t.trust_remote_code, revision=t.revision)
        if cfg.extract.gpus_per_replica > 0 and torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.layers, self.pad_id, self.cfg = layers, pad_id, cfg

    def run(self, part: str, split: str, chunk: int, seqs: Sequences) -> tuple[int, float]:
        t0 = time.perf_counter()
        out = forward_rows(
            self.model, seqs, np.arange(seqs.n_rows), self.layers,
            pool=self.cfg.prompt.pool, pad_id=self.pad_id, batch_size=self.cfg.extract.batch_size,
        )
        store.write_chunk(part, split, chunk, out.states, out.scores)
        return out.tokens, time.perf_counter() - t0


def store_meta(cfg: Config, model_path: str, layers: list[int], n_model_layers: int, hidden: int) -> dict:
    versions = {p: md.version(p) for p in ("torch", "transformers", "zarr", "ray")}
    return {
        "config": to_dict(cfg), "config_hash": config_hash(cfg), "model_path": model_path,
        "layers": layers, "n_model_layers": n_model_layers, "hidden_size": hidden,
        "mode": cfg.prompt.mode, "pool": cfg.prompt.pool, "versions": versions,
    }


def _new_actor(model_path: str, cfg: Config, layers: list[int], pad_id: int):
    e = cfg.extract
    return (
        ray.remote(TeacherActor)
        .options(num_cpus=e.cpus_per_replica, num_gpus=e.gpus_per_replica, max_restarts=0)
        .remote(model_path, cfg, layers, pad_id)
    )


def run_extraction(
    cfg: Config, model_path: str, splits: dict[str, tuple[Sequences, list[str]]], layers: list[int],
    n_model_layers: int, hidden: int, pad_id: int,
) -> Path:
    """Build (or resume, or reuse) the activation store for all splits. Returns its committed path."""
    path = Path(cfg.out_dir) / "activations.zarr"
    identity = store_identity(cfg)
    if path.exists():
        store.open_store(path, identity)  # raises, naming the field, if made under another config
        print(f"[extract] reusing {path}", flush=True)
        return path
    layout = {name: (s, ids, len(layers), hidden) for name, (s, ids) in splits.items()}
    meta = store_meta(cfg, model_path, layers, n_model_layers, hidden)
    part = str(store.create_or_resume(path, identity, meta, layout))
    chunk_rows = cfg.extract.chunk_rows
    queue = deque(
        (name, c) for name, (s, _) in splits.items()
        for c in store.pending_chunks(store.done_mask(part, name))
    )
    total_rows = sum(s.n_rows for s, _ in splits.values())
    todo_rows = sum(np.diff(store.chunk_bounds(c, splits[n][0].n_rows, chunk_rows))[0] for n, c in queue)
    print(f"[extract] {len(queue)} chunks ({todo_rows}/{total_rows} rows) to do, "
          f"{cfg.extract.replicas} replica(s), layers {layers[0]}..{layers[-1]} ({len(layers)})", flush=True)
    actors = [_new_actor(model_path, cfg, layers, pad_id) for _ in range(cfg.extract.replicas)]
    inflight: dict = {}
    retries: dict = {}
    t0, done_rows, done_tokens = time.perf_counter(), 0, 0

    def submit(actor) -> None:
        if queue:
            name, c = queue.popleft()
            lo, hi = store.chunk_bounds(c, splits[name][0].n_rows, chunk_rows)
            ref = actor.run.remote(part, name, c, splits[name][0].rows_view(lo, hi))
            inflight[ref] = (actor, name, c, hi - lo)

    for a in actors:
        submit(a)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, name, c, n = inflight.pop(ready[0])
        try:
            tokens, _ = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            retries[(name, c)] = retries.get((name, c), 0) + 1
            if retries[(name, c)] > MAX_CHUNK_RETRIES:
                raise RuntimeError(f"[extract] chunk {c} of {name} failed {MAX_CHUNK_RETRIES} times: {err}") from err
            print(f"[extract] replica died on {name} chunk {c}; retrying on a fresh replica", flush=True)
            queue.appendleft((name, c))
            actor = _new_actor(model_path, cfg, layers, pad_id)
            actors.append(actor)
            submit(actor)
            continue
        store.mark_done(part, name, c)
        done_rows, done_tokens = done_rows + n, done_tokens + tokens
        el = time.perf_counter() - t0
        eta = el / done_rows * (todo_rows - done_rows)
        print(f"[extract] {name} chunk {c} done | {done_rows}/{todo_rows} rows | {done_tokens / el:.0f} tok/s "
              f"| {el:.0f}s elapsed, ~{eta:.0f}s left", flush=True)
        submit(actor)
    for a in actors:
        ray.kill(a)
    store.set_attr(part, "extract_seconds", round(time.perf_counter() - t0, 1))
    final = store.commit(path)
    print(f"[extract] committed {final}", flush=True)
    return final
