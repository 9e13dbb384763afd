"""The activation store: one Zarr group per run, one subgroup per split.

    <split>/activations  (rows, layers, hidden) float16, chunks (chunk_size(rows, chunk_rows), 1, hidden)
    <split>/scores       (rows, S) float32   teacher scores from the same forward (if extracted)
    <split>/row_question, row_choice, start (rows,) int64
    <split>/answer, n_choices (questions,) int64;  <split>/ids (questions,) str
    <split>/done         (n_chunks,) bool    written only by the driver, after a chunk is stored

A store is built at `<path>.partial`, tracked chunk by chunk (Zarr leaves all-fill chunks absent, so
files on disk prove nothing), and committed by an atomic rename once every chunk is done. The root's
attributes hold the identity (what decides the content), the resolved config and its hash.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from engine.sequences import Sequences

FORMAT = "probe-kd-activations/1"


class StoreError(RuntimeError):
    """The store is missing, incomplete, or was made under a different config."""


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + ".partial")


def identity_diff(stored: dict, wanted: dict) -> str | None:
    """The first field whose value differs, as a readable sentence, or None."""
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            return f"{key}: store has {stored.get(key)!r}, config has {wanted.get(key)!r}"
    return None


def n_chunks(n_rows: int, chunk_rows: int) -> int:
    return -(-n_rows // chunk_rows)


def chunk_size(n_rows: int, max_rows: int) -> int:
    """Rows per chunk of a split: at most `max_rows`, balanced so the last chunk is nearly full.
    Zarr stores an edge chunk whole, padding included, so this keeps the bytes on disk at the payload."""
    if n_rows <= 0:
        return max(1, max_rows)
    return -(-n_rows // n_chunks(n_rows, max_rows))


def chunk_bounds(chunk: int, n_rows: int, chunk_rows: int) -> tuple[int, int]:
    return chunk * chunk_rows, min((chunk + 1) * chunk_rows, n_rows)


def pending_chunks(done: np.ndarray) -> list[int]:
    """Chunks still to compute: the resume plan."""
    return [int(i) for i in np.flatnonzero(~np.asarray(done, dtype=bool))]


def _check_identity(root: zarr.Group, identity: dict, where: Path) -> None:
    diff = identity_diff(dict(root.attrs.get("identity", {})), identity)
    if diff:
        raise StoreError(
            f"{where} was made under a different config ({diff}). Use another out_dir, or delete "
            f"the store yourself to rebuild it."
        )


def create_or_resume(
    path: str | Path, identity: dict, meta: dict, splits: dict[str, tuple[Sequences, list[str], int, int]],
    *, scores: bool = True,
) -> Path:
    """Open `<path>.partial` to continue it, or lay it out afresh. Returns the partial path.

    `splits` maps split name -> (sequences, question ids, layer count, hidden size). `scores`: lay out
    the teacher-score arrays too.
    """
    part = partial_path(path)
    if part.exists():
        root = zarr.open_group(str(part), mode="r+")
        _check_identity(root, identity, part)
        return part
    tmp = Path(str(part) + ".init")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    max_rows = int(identity["extract.chunk_rows"])
    for name, (seqs, ids, n_layers, hidden) in splits.items():
        g = root.create_group(name)
        chunk_rows = chunk_size(seqs.n_rows, max_rows)
        g.create_array("activations", shape=(seqs.n_rows, n_layers, hidden), chunks=(chunk_rows, 1, hidden),
                       dtype="float16", fill_value=0, compressors=None)
        if scores:
            g.create_array("scores", shape=(seqs.n_rows, seqs.score_width), chunks=(chunk_rows, seqs.score_width),
                           dtype="float32", fill_value=0)
        for key in ("row_question", "row_choice", "start"):
            g.create_array(key, data=getattr(seqs, key).astype(np.int64))
        g.create_array("answer", data=seqs.answer.astype(np.int64))
        g.create_array("n_choices", data=seqs.n_choices.astype(np.int64))
        g.create_array("ids", shape=(len(ids),), dtype=str)
        if len(ids):
            g["ids"][:] = np.asarray(ids, dtype=object)
        g.create_array("done", shape=(n_chunks(seqs.n_rows, chunk_rows),), chunks=(1,), dtype=bool, fill_value=False)
        g.attrs["letter_ids"] = [int(x) for x in seqs.letter_ids]
    root.attrs.update({"format": FORMAT, "identity": identity, "complete": False, **meta})
    os.replace(tmp, part)
    return part


def write_chunk(part: str | Path, split: str, chunk: int, states: np.ndarray, scores: np.ndarray | None) -> None:
    """Write one whole chunk of rows. Only the owner of a chunk ever writes it."""
    g = zarr.open_group(str(part), mode="r+")[split]
    acts = g["activations"]
    lo, hi = chunk_bounds(chunk, acts.shape[0], acts.chunks[0])
    if states.shape[0] != hi - lo or (scores is not None and scores.shape[0] != hi - lo):
        raise StoreError(f"chunk {chunk} of {split} holds rows {lo}:{hi}, got {states.shape[0]} rows")
    if (scores is None) == ("scores" in g):
        raise StoreError(f"{part}: teacher scores {'missing' if scores is None else 'not laid out'} for chunk {chunk} of {split}")
    acts[lo:hi] = states
    if scores is not None:
        g["scores"][lo:hi] = scores


def mark_done(part: str | Path, split: str, chunk: int) -> None:
    zarr.open_group(str(part), mode="r+")[split]["done"][chunk] = True


def set_attr(part: str | Path, key: str, value) -> None:
    """Record a fact about a store still being built (not allowed once committed)."""
    zarr.open_group(str(part), mode="r+").attrs[key] = value


def done_mask(part: str | Path, split: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(part), mode="r")[split]["done"][:], dtype=bool)


def commit(path: str | Path) -> Path:
    """Rename `<path>.partial` to `<path>` once every chunk of every split is done."""
    part, final = partial_path(path), Path(path)
    root = zarr.open_group(str(part), mode="r+")
    for name, g in root.groups():
        missing = pending_chunks(g["done"][:])
        if missing:
            raise StoreError(f"{part}: split {name} has {len(missing)} chunks not done (first {missing[0]}); resume the run")
    if final.exists():
        raise StoreError(f"{final} exists; refusing to overwrite it. Delete it or use another out_dir")
    root.attrs["complete"] = True
    os.replace(part, final)
    return final


@dataclass
class SplitView:
    """Read access to one split of a committed store."""

    group: zarr.Group
    seqs: Sequences
    ids: list[str]
    layers: list[int]

    def layer(self, layer: int) -> np.ndarray:
        """(rows, hidden) float32 states of one layer (1-based, as stored in `layers`)."""
        return np.asarray(self.group["activations"][:, self.layers.index(layer), :], dtype=np.float32)

    @property
    def has_scores(self) -> bool:
        return "scores" in self.group

    def scores(self) -> np.ndarray:
        if not self.has_scores:
            raise StoreError("this store holds no teacher scores (made with extract.teacher_scores=false); "
                             "set it true in a new out_dir, or drop the 'logit' label source")
        return np.asarray(self.group["scores"][:])


def open_store(path: str | Path, identity: dict | None = None, *, allow_incomplete: bool = False) -> zarr.Group:
    """Open a store for reading. An incomplete store is refused unless `allow_incomplete`."""
    p = Path(path)
    if not p.exists() and allow_incomplete and partial_path(p).exists():
        p = partial_path(p)
    if not p.exists() and partial_path(p).exists():
        raise StoreError(f"{path}: store is incomplete (only {partial_path(p).name} exists); resume `distill extract`, "
                         "or pass allow_incomplete=True")
    if not p.exists():
        raise StoreError(f"{path}: no activation store here; run `distill extract` first")
    root = zarr.open_group(str(p), mode="r")
    if root.attrs.get("format") != FORMAT:
        raise StoreError(f"{p}: not a probe-kd activation store (format {root.attrs.get('format')!r})")
    if not root.attrs.get("complete") and not allow_incomplete:
        raise StoreError(f"{p}: store is incomplete; resume `distill extract`, or pass allow_incomplete=True")
    if identity is not None:
        _check_identity(root, identity, p)
    return root


def read_split(root: zarr.Group, split: str, mode: str) -> SplitView:
    g = root[split]
    seqs = Sequences(
        mode=mode,
        ids=[],
        start=g["start"][:],
        row_question=g["row_question"][:],
        row_choice=g["row_choice"][:],
        n_choices=g["n_choices"][:],
        answer=g["answer"][:],
        letter_ids=np.asarray(g.attrs["letter_ids"], dtype=np.int64),
    )
    layers = [int(x) for x in root.attrs["layers"]]
    return SplitView(group=g, seqs=seqs, ids=[str(x) for x in g["ids"][:]], layers=layers)
