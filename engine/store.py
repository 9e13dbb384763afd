"""The activation store: one Zarr group per run, one subgroup per split.

    <split>/activations  (rows, layers, hidden) float16, chunks (chunk_size(rows, chunk_rows), 1, hidden)
    <split>/scores       (rows, S) float32   teacher scores from the same forward (if extracted)
    <split>/row_question, row_choice, start (rows,) int64
    <split>/answer, n_choices (questions,) int64;  <split>/ids (questions,) str
    <split>/done         (n_chunks,) bool    written only by the driver, after a chunk is stored

A store is built at `<path>.partial`, tracked chunk by chunk (Zarr leaves all-fill chunks absent, so
files on disk prove nothing), and committed by an atomic rename once every chunk is done. The root's
attributes hold the identity (what decides the content), its hash, the resolved config and its hash.

Every chunk of every array ends in a CRC-32C checksum (Zarr 3's `crc32c` codec, 4 bytes a chunk).
Readers verify as they read: a chunk whose bytes changed raises one StoreError naming the store, the
array and the chunk. `verify_store` checks a whole store (checksums, completeness, shapes, identity).
Stores of format /1 (before checksums) are still read; `verify_store` says they carry none.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from engine.sequences import Sequences

# Tests only: "<split>:<chunk>" makes that chunk's write fail as a full disk would (ENOSPC), the way the
# disk-full trial failed, without needing a size-limited filesystem (mounting one takes privileges).
INJECT_ENOSPC = "PROBE_KD_INJECT_ENOSPC"

FORMAT = "probe-kd-activations/2"
FORMATS = ("probe-kd-activations/1", FORMAT)  # /1: the same layout without chunk checksums
CHECKSUM = Crc32cCodec()


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


def identity_hash(identity: dict) -> str:
    """sha256 of the identity's canonical JSON: recorded beside it, so a hand edit is detected."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    tmp = Path(f"{part}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # a name no other writer uses
    root = zarr.open_group(str(tmp), mode="w")
    max_rows = int(identity["extract.chunk_rows"])
    for name, (seqs, ids, n_layers, hidden) in splits.items():
        g = root.create_group(name)
        chunk_rows = chunk_size(seqs.n_rows, max_rows)
        g.create_array("activations", shape=(seqs.n_rows, n_layers, hidden), chunks=(chunk_rows, 1, hidden),
                       dtype="float16", fill_value=0, compressors=[CHECKSUM])
        if scores:
            g.create_array("scores", shape=(seqs.n_rows, seqs.score_width), chunks=(chunk_rows, seqs.score_width),
                           dtype="float32", fill_value=0, compressors=[ZstdCodec(), CHECKSUM])
        small = [ZstdCodec(), CHECKSUM]
        for key in ("row_question", "row_choice", "start"):
            g.create_array(key, data=getattr(seqs, key).astype(np.int64), compressors=small)
        g.create_array("answer", data=seqs.answer.astype(np.int64), compressors=small)
        g.create_array("n_choices", data=seqs.n_choices.astype(np.int64), compressors=small)
        g.create_array("ids", shape=(len(ids),), dtype=str, compressors=small)
        if len(ids):
            g["ids"][:] = np.asarray(ids, dtype=object)
        g.create_array("done", shape=(n_chunks(seqs.n_rows, chunk_rows),), chunks=(1,), dtype=bool, fill_value=False,
                       compressors=[CHECKSUM])
        g.attrs["letter_ids"] = [int(x) for x in seqs.letter_ids]
    root.attrs.update({"format": FORMAT, "identity": identity, "identity_hash": identity_hash(identity),
                       "complete": False, **meta})
    try:
        os.replace(tmp, part)
    except OSError as err:  # another writer laid it out first: theirs stands, this one is dropped
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"{part} was laid out by another writer at the same time ({err.strerror}); "
                         "one writer per out_dir: wait for it, or use another out_dir") from err
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
    if os.environ.get(INJECT_ENOSPC) == f"{split}:{chunk}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(part) / split / "activations"))
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


def chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The chunk's key inside the array's folder, e.g. `c/3/0/0`."""
    return arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))


def bad_chunks(arr: zarr.Array, *, first: bool = False) -> list[tuple[tuple[int, ...], str]]:
    """(chunk coordinates, what is wrong) for each chunk that fails to decode (a checksum mismatch, a
    truncated or garbled file). Reads the whole array, one chunk at a time."""
    bad = []
    for coords in itertools.product(*(range(n) for n in arr.cdata_shape)):
        sel = tuple(slice(c * k, min((c + 1) * k, n)) for c, k, n in zip(coords, arr.chunks, arr.shape, strict=True))
        try:
            arr[sel]
        except Exception as err:  # noqa: BLE001 - every decode failure is a bad chunk
            bad.append((coords, str(err).split(". ")[0]))
            if first:
                break
    return bad


def read_checked(arr: zarr.Array, selection=slice(None), where: str | Path = "") -> np.ndarray:
    """`arr[selection]`, turning a chunk that fails its checksum (or cannot be decoded) into one
    StoreError that names the store, the array and the chunk."""
    try:
        return arr[selection]
    except Exception as err:  # noqa: BLE001 - located and re-raised below
        bad = bad_chunks(arr, first=True)
        if not bad:
            raise
        coords, why = bad[0]
        raise StoreError(
            f"{where}: array {arr.path} chunk {chunk_file(arr, coords)} is corrupt ({why}); the store's bytes "
            "changed on disk. Run `distill verify` on the out_dir, then delete the store and re-extract") from err


@dataclass
class SplitView:
    """Read access to one split of a committed store."""

    group: zarr.Group
    seqs: Sequences
    ids: list[str]
    layers: list[int]
    where: str = ""

    def layer(self, layer: int) -> np.ndarray:
        """(rows, hidden) float32 states of one layer (1-based, as stored in `layers`)."""
        states = read_checked(self.group["activations"], (slice(None), self.layers.index(layer), slice(None)),
                              self.where)
        return np.asarray(states, dtype=np.float32)

    @property
    def has_scores(self) -> bool:
        return "scores" in self.group

    def scores(self) -> np.ndarray:
        if not self.has_scores:
            raise StoreError("this store holds no teacher scores (made with extract.teacher_scores=false); "
                             "set it true in a new out_dir, or drop the 'logit' label source")
        return np.asarray(read_checked(self.group["scores"], slice(None), self.where))


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
    try:
        root = zarr.open_group(str(p), mode="r")
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        raise StoreError(f"{p}: not a readable Zarr group ({err}); delete it and re-extract") from err
    if root.attrs.get("format") not in FORMATS:
        raise StoreError(f"{p}: not a probe-kd activation store (format {root.attrs.get('format')!r})")
    if not root.attrs.get("complete") and not allow_incomplete:
        raise StoreError(f"{p}: store is incomplete; resume `distill extract`, or pass allow_incomplete=True")
    if identity is not None:
        _check_identity(root, identity, p)
    return root


def read_split(root: zarr.Group, split: str, mode: str) -> SplitView:
    where = str(getattr(root.store, "root", root.store_path))
    problems = check_layout(root, splits=(split,))
    if problems:
        raise StoreError(f"{where}: {problems[0]}; the store was changed by hand or is damaged: delete it and re-extract")
    g = root[split]

    def read(key: str) -> np.ndarray:
        return read_checked(g[key], slice(None), where)

    seqs = Sequences(
        mode=mode,
        ids=[],
        start=read("start"),
        row_question=read("row_question"),
        row_choice=read("row_choice"),
        n_choices=read("n_choices"),
        answer=read("answer"),
        letter_ids=np.asarray(g.attrs["letter_ids"], dtype=np.int64),
    )
    layers = [int(x) for x in root.attrs["layers"]]
    return SplitView(group=g, seqs=seqs, ids=[str(x) for x in read("ids")], layers=layers, where=where)


SPLIT_ARRAYS = ("activations", "row_question", "row_choice", "start", "answer", "n_choices", "ids", "done")


def check_layout(root: zarr.Group, splits: tuple[str, ...] | None = None) -> list[str]:
    """What is wrong with the store's structure, from metadata alone (no chunk is read): missing arrays,
    shapes that disagree with each other or with the recorded layers, an identity edited by hand."""
    problems = []
    ident, recorded = root.attrs.get("identity"), root.attrs.get("identity_hash")
    if ident is None:
        problems.append("no identity attribute")
    elif recorded is not None and identity_hash(dict(ident)) != recorded:
        problems.append(f"identity attribute edited (its hash is {identity_hash(dict(ident))}, recorded {recorded})")
    layers = root.attrs.get("layers")
    names = splits if splits is not None else tuple(name for name, _ in root.groups())
    for name in names:
        if name not in root:
            problems.append(f"split {name} missing")
            continue
        g = root[name]
        missing = [k for k in SPLIT_ARRAYS if k not in g]
        if missing:
            problems.append(f"split {name}: array {missing[0]} missing")
            continue
        rows, questions = g["row_question"].shape[0], g["answer"].shape[0]
        hidden = root.attrs.get("hidden_size", g["activations"].shape[-1])
        expect = {"activations": (rows, len(layers or []), hidden),
                  "row_choice": (rows,), "start": (rows,), "n_choices": (questions,), "ids": (questions,)}
        if "scores" in g:
            expect["scores"] = (rows, g["scores"].shape[1])
        for key, shape in expect.items():
            if tuple(g[key].shape) != shape:
                problems.append(f"split {name}: array {key} has shape {tuple(g[key].shape)}, expected {shape}")
    return problems


def verify_store(path: str | Path) -> tuple[bool, str]:
    """(ok, one-line verdict) for a committed or partial store: its layout, identity, completeness
    and every chunk's checksum."""
    p = Path(path)
    try:
        root = open_store(p, allow_incomplete=True)
    except StoreError as err:
        return False, str(err)
    problems = check_layout(root)
    if problems:
        return False, f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    checked = root.attrs.get("format") == FORMAT
    n_chunks_total = 0
    for name, g in root.groups():
        for key in g.array_keys():
            arr = g[key]
            n_chunks_total += int(np.prod(arr.cdata_shape))
            bad = bad_chunks(arr)
            if bad:
                coords, why = bad[0]
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                return False, f"split {name} array {key} chunk {chunk_file(arr, coords)} is corrupt ({why}){more}"
        pending = pending_chunks(g["done"][:])
        if root.attrs.get("complete") and pending:
            return False, f"marked complete, but split {name} has {len(pending)} chunks not done"
    state = "complete" if root.attrs.get("complete") else "incomplete (resumable)"
    sums = "every chunk's checksum matches" if checked else "format /1: no checksums to check; re-extract to get them"
    return True, f"{state}, {n_chunks_total} chunks read, {sums}"
