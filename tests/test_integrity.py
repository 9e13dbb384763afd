"""Integrity without Ray: checksummed chunks named when they go bad, stores and artifacts edited by hand,
one writer per run directory (and a stale lock taken over), faults of the environment named in one line."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import ctrl_c_reaches_the_child
from test_store import IDENTITY, _fill, _seqs

from cluster import failures
from engine import artifacts, store
from engine.lock import LockError, RunLock
from engine.verify import kept, scan, verify

REPO = Path(__file__).resolve().parents[1]


def _store(tmp_path: Path) -> Path:
    seqs, path = _seqs(), tmp_path / "run" / "activations.zarr"
    part = store.create_or_resume(path, IDENTITY, {"layers": [1, 2], "hidden_size": 8},
                                  {"train": (seqs, [f"q{i}" for i in range(5)], 2, 8)})
    _fill(part, seqs)
    return store.commit(path)


def _flip(file: Path, at: int = 10) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_flipped_chunk_is_named_by_readers_and_verify(tmp_path):
    path = _store(tmp_path)
    view = store.read_split(store.open_store(path), "train", "per_choice")
    before = view.layer(2)
    chunk = path / "train" / "activations" / "c" / "1" / "1" / "0"  # rows 4..7 of layer 2
    _flip(chunk)
    with pytest.raises(store.StoreError, match=r"activations\.zarr: array train/activations chunk c/1/1/0 is corrupt"):
        view.layer(2)
    np.testing.assert_array_equal(view.layer(1)[:, 0], np.repeat([1, 2, 3], [4, 4, 2]))  # other chunks still read
    ok, line = store.verify_store(path)
    assert not ok and "split train array activations chunk c/1/1/0 is corrupt" in line, line
    verdicts = verify(tmp_path / "run")
    assert [(v.kind, v.ok) for v in verdicts] == [("store", False)]
    _flip(chunk)  # flipped back: the same bytes, the same states
    np.testing.assert_array_equal(view.layer(2), before)
    assert store.verify_store(path)[0]


def test_checksums_cost_four_bytes_a_chunk(tmp_path):
    path = _store(tmp_path)
    acts = zarr.open_group(str(path), mode="r")["train"]["activations"]
    files = sorted((path / "train" / "activations" / "c").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 6  # 3 row chunks x 2 layers
    payload = acts.shape[0] * acts.shape[1] * acts.shape[2] * 2
    assert sum(f.stat().st_size for f in files) == payload + 2 * 2 * 8 * 2 + 4 * len(files)  # edge chunk padded


@pytest.mark.parametrize("edit", ["wrong shape", "missing array", "identity edited"])
def test_a_store_edited_by_hand_is_refused(tmp_path, edit):
    path = _store(tmp_path)
    root = zarr.open_group(str(path), mode="r+")
    if edit == "wrong shape":
        del root["train"]["answer"]
        root["train"].create_array("answer", data=np.zeros(7, np.int64))
        want = r"array n_choices has shape \(5,\), expected \(7,\)|array ids has shape \(5,\), expected \(7,\)"
    elif edit == "missing array":
        shutil.rmtree(path / "train" / "row_choice")
        want = "array row_choice missing"
    else:
        ident = dict(root.attrs["identity"])
        ident["extract.layers"] = [1, 3]
        root.attrs["identity"] = ident
        want = "identity attribute edited"
    ok, line = store.verify_store(path)
    assert not ok and __import__("re").search(want, line), line
    with pytest.raises(store.StoreError, match=want):
        store.read_split(store.open_store(path), "train", "per_choice")


def test_artifacts_carry_checksums_of_every_file(tmp_path):
    where, ident = tmp_path / "run" / "probes-1", {"probe": 1}
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    artifacts.save(where, ident, {"note": "x"}, {"probs": np.eye(3)}, folders={"model": model})
    meta = json.loads((where / "meta.json").read_text())
    assert set(meta["files"]) == {"probs.npy", "model/weights.bin"}
    assert artifacts.load(where, ident)[1]["probs"].shape == (3, 3)
    assert verify(tmp_path / "run")[0].ok

    _flip(where / "model" / "weights.bin")
    with pytest.raises(store.StoreError, match="file model/weights.bin changed on disk"):
        artifacts.load(where, ident)
    assert not verify(tmp_path / "run")[0].ok
    _flip(where / "model" / "weights.bin")

    meta["identity"] = {"probe": 2}  # edited by hand to pass for another config
    (where / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="identity in meta.json was edited"):
        artifacts.load(where, {"probe": 2})
    (where / "probs.npy").unlink()
    assert "file probs.npy is missing" in artifacts.verify(where)[1] or "edited" in artifacts.verify(where)[1]


def test_writers_build_under_names_of_their_own(tmp_path):
    where = tmp_path / "run" / "baseline-1"
    leftover = Path(f"{where}.partial-99999-deadbeef")  # a dead writer's half-written folder
    leftover.mkdir(parents=True)
    (leftover / "junk.npy").write_bytes(b"junk")
    artifacts.save(where, {"a": 1}, {}, {"x": np.arange(3)})
    assert (leftover / "junk.npy").exists()  # nobody else's files are deleted or mixed in
    assert sorted(p.name for p in where.iterdir()) == ["meta.json", "x.npy"]
    with pytest.raises(store.StoreError, match="exists; refusing to overwrite"):
        artifacts.save(where, {"a": 1}, {}, {"x": np.arange(3)})
    assert [p for p, _ in scan(tmp_path / "run")] == [where]
    assert kept(tmp_path / "run") == "1 committed artifact"


_HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from engine.lock import RunLock
lock = RunLock({out!r}, "distill extract configs/x.yaml").acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def test_one_writer_per_run_directory_and_stale_locks(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=str(REPO), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(LockError, match=rf"in use by pid {holder.pid} on .*'distill extract configs/x.yaml'"):
            RunLock(out, "distill probe").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the file still names it
        holder.wait()
    assert json.loads((out / ".distill.lock").read_text())["pid"] == holder.pid
    with RunLock(out, "distill probe") as lock:
        assert lock.took_over["pid"] == holder.pid
        with pytest.raises(LockError, match=f"in use by pid {os.getpid()}"):
            RunLock(out, "another").acquire()  # a second holder, even in the same process, is refused
    with RunLock(out, "again") as lock:
        assert lock.took_over is None  # released cleanly last time


def test_faults_of_the_environment_are_one_line():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    def raised(err):
        try:
            raise err
        except Exception as e:  # noqa: BLE001
            return e

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/activations.zarr.partial/train/activations")
    wrapped = RayTaskError("run", "Traceback ...", full)
    assert failures.describe(wrapped) == (
        "disk full writing /out/activations.zarr.partial/train/activations (No space left on device). "
        "Free space (or point out_dir elsewhere)")
    assert failures.describe(WorkerGroupError("rank 0 died", {0: MemoryError()})).startswith("out of memory")
    gone = raised(RuntimeError("reading the model failed"))
    gone.__cause__ = FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/t/model.safetensors")
    assert failures.describe(gone).startswith("/models/t/model.safetensors vanished mid-run")
    as_text = RuntimeError("The actor died because of an error raised in its creation task ... FileNotFoundError: "
                           "[Errno 2] No such file or directory: '/models/t/model.safetensors'")
    assert failures.describe(as_text).startswith("/models/t/model.safetensors vanished mid-run")
    hf = RuntimeError("OSError: Error no file named model.safetensors found in directory /models/t.")
    assert failures.describe(hf).startswith("/models/t/model.safetensors vanished mid-run")
    assert failures.describe(failures.RayStartError("locally: port 6379 in use")).startswith("Ray failed to start")
    assert failures.describe(ValueError("a bug")) is None  # a bug keeps its traceback


def test_sigterm_and_sigint_leave_the_lock_free(tmp_path):
    """A `distill` stopped while it holds the lock releases it (and a killed one leaves it takeable)."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from engine.lock import RunLock
        with RunLock({str(out)!r}, "x"):
            print("HELD", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_the_child)
    assert proc.stdout.readline().strip() == "HELD"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert (out / ".distill.lock").read_text() == ""  # released: the file names nobody
