"""The activation store: chunk ownership, explicit completion, commit by rename, identity checks."""

import numpy as np
import pytest
import zarr

from engine import store
from engine.sequences import Sequences

IDENTITY = {"teacher.model": "m", "extract.layers": [1, 2], "extract.chunk_rows": 4}


def _seqs(n_q=5, k=2):
    rows = n_q * k
    return Sequences(
        mode="per_choice", ids=[np.arange(3)] * rows, start=np.full(rows, 2),
        row_question=np.repeat(np.arange(n_q), k), row_choice=np.tile(np.arange(k), n_q),
        n_choices=np.full(n_q, k), answer=np.arange(n_q) % k, letter_ids=np.zeros(0, dtype=np.int64),
    )


def _fill(part, seqs, chunks=None):
    n = store.n_chunks(seqs.n_rows, 4)
    for c in chunks if chunks is not None else range(n):
        lo, hi = store.chunk_bounds(c, seqs.n_rows, 4)
        states = np.full((hi - lo, 2, 8), c + 1, dtype=np.float16)
        store.write_chunk(part, "train", c, states, np.zeros((hi - lo, 2), np.float32))
        store.mark_done(part, "train", c)


def test_build_commit_and_read(tmp_path):
    seqs, path = _seqs(), tmp_path / "acts.zarr"
    part = store.create_or_resume(path, IDENTITY, {"layers": [1, 2]}, {"train": (seqs, [f"q{i}" for i in range(5)], 2, 8)})
    assert part == store.partial_path(path) and not path.exists()
    _fill(part, seqs)
    store.commit(path)
    assert path.exists() and not part.exists()
    root = store.open_store(path, IDENTITY)
    view = store.read_split(root, "train", "per_choice")
    assert view.ids == ["q0", "q1", "q2", "q3", "q4"]
    # the last chunk is short (10 rows, chunks of 4): every row has its chunk's value, none is fill
    np.testing.assert_array_equal(view.layer(2)[:, 0], np.repeat([1, 2, 3], [4, 4, 2]))
    np.testing.assert_array_equal(view.seqs.row_question, seqs.row_question)


def test_incomplete_store_is_refused_and_resumed(tmp_path):
    seqs, path = _seqs(), tmp_path / "acts.zarr"
    layout = {"train": (seqs, [str(i) for i in range(5)], 2, 8)}
    part = store.create_or_resume(path, IDENTITY, {"layers": [1, 2]}, layout)
    _fill(part, seqs, chunks=[0, 2])
    with pytest.raises(store.StoreError, match="1 chunks not done"):
        store.commit(path)
    with pytest.raises(store.StoreError, match="store is incomplete"):
        store.open_store(path)
    with pytest.raises(store.StoreError, match="incomplete"):
        store.open_store(part)
    assert store.open_store(path, allow_incomplete=True) is not None
    # resume: same identity reopens the partial store; only chunk 1 is pending
    again = store.create_or_resume(path, IDENTITY, {"layers": [1, 2]}, layout)
    assert store.pending_chunks(store.done_mask(again, "train")) == [1]
    # completion is explicit: a written chunk that was never marked done is still pending
    store.write_chunk(again, "train", 1, np.ones((4, 2, 8), np.float16), np.zeros((4, 2), np.float32))
    assert store.pending_chunks(store.done_mask(again, "train")) == [1]


def test_other_config_is_refused_naming_the_field(tmp_path):
    seqs, path = _seqs(), tmp_path / "acts.zarr"
    layout = {"train": (seqs, [str(i) for i in range(5)], 2, 8)}
    store.create_or_resume(path, IDENTITY, {}, layout)
    with pytest.raises(store.StoreError, match=r"extract\.layers: store has \[1, 2\], config has \[1, 3\]"):
        store.create_or_resume(path, {**IDENTITY, "extract.layers": [1, 3]}, {}, layout)


def test_chunk_writes_must_be_whole(tmp_path):
    seqs, path = _seqs(), tmp_path / "acts.zarr"
    part = store.create_or_resume(path, IDENTITY, {}, {"train": (seqs, [str(i) for i in range(5)], 2, 8)})
    with pytest.raises(store.StoreError, match="holds rows 0:4"):
        store.write_chunk(part, "train", 0, np.ones((3, 2, 8), np.float16), np.zeros((3, 2), np.float32))
    assert zarr.open_group(str(part))["train"]["activations"].chunks == (4, 1, 8)


def test_commit_never_overwrites(tmp_path):
    seqs, path = _seqs(), tmp_path / "acts.zarr"
    layout = {"train": (seqs, [str(i) for i in range(5)], 2, 8)}
    _fill(store.create_or_resume(path, IDENTITY, {}, layout), seqs)
    store.commit(path)
    _fill(store.create_or_resume(path, IDENTITY, {}, layout), seqs)
    with pytest.raises(store.StoreError, match="refusing to overwrite"):
        store.commit(path)
