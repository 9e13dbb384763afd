"""Extraction faults: a run killed with SIGKILL resumes to the same store; a replica dying mid-chunk
costs no rows and duplicates none; a changed config is refused, naming the field."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO, assert_same_store, distill, extract_args

from engine import store
from engine.config import ConfigError, ExtractConfig


def test_replica_bundles_and_fit_check():
    from cluster.extract import check_fits, replica_bundles

    e = ExtractConfig(replicas=3, cpus_per_replica=4, gpus_per_replica=2)
    assert replica_bundles(e) == [{"CPU": 4.0, "GPU": 2.0}] * 3
    assert replica_bundles(ExtractConfig(replicas=2, cpus_per_replica=1)) == [{"CPU": 1.0}] * 2
    check_fits(replica_bundles(e), {"CPU": 16.0, "GPU": 8.0}, "PACK")
    with pytest.raises(ConfigError, match=r"extract.replicas x extract.gpus_per_replica: the pool needs 6 GPUs, the cluster has 4"):
        check_fits(replica_bundles(e), {"CPU": 16.0, "GPU": 4.0}, "PACK")


def test_teacher_devices():
    from cluster.extract import teacher_devices

    assert teacher_devices(0, cuda=True) == (None, None)
    assert teacher_devices(1, cuda=False) == (None, None)  # logical GPUs on a CPU machine
    assert teacher_devices(0.5, cuda=True) == (None, "cuda")
    assert teacher_devices(1, cuda=True) == (None, "cuda")
    assert teacher_devices(4, cuda=True) == ("auto", None)


def _done(part: Path) -> tuple[int, int]:
    root = zarr.open_group(str(part), mode="r")
    masks = [g["done"][:] for _, g in root.groups()]
    return sum(int(m.sum()) for m in masks), sum(len(m) for m in masks)


def _kill_after_chunks(args: list[str], k: int) -> str:
    """Start `distill`, SIGKILL its whole process group once `k` chunks are reported done."""
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        seen += " done by replica " in line
        if seen >= k:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return "".join(lines)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_store(tmp_path, tiny_model, extract_reference):
    out = tmp_path / "run"
    k = random.Random().randint(1, 12)
    log = _kill_after_chunks(extract_args(tiny_model, out), k)
    path = out / "activations.zarr"
    part = store.partial_path(path)
    assert not path.exists() and part.exists(), log[-2000:]
    done, total = _done(part)
    assert k <= done < total, (k, done, total)

    # A reader refuses the incomplete store; resuming under a config that changes the store is refused.
    with pytest.raises(store.StoreError, match="incomplete"):
        store.open_store(path)
    refused = distill(*extract_args(tiny_model, out, "extract.layers=[1, 2]"))
    assert refused.returncode == 2
    assert "extract.layers: store has [1, 2, 3, 4], config has [1, 2]" in refused.stderr
    assert refused.stderr.count("distill: error:") == 1
    assert _done(part) == (done, total)

    resumed = distill(*extract_args(tiny_model, out))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{total - done} chunks" in resumed.stdout
    assert path.exists() and not part.exists()
    assert_same_store(path, extract_reference)
    runs = zarr.open_group(str(path), mode="r").attrs["extract_log"]
    assert len(runs) == 1 and len(runs[0]["chunks"]) == total - done  # the killed run never logged


@pytest.mark.slow
def test_replica_dying_mid_chunk_costs_no_rows(tmp_path, tiny_model, extract_reference):
    from cluster import pipeline, runtime
    from cluster.extract import TeacherActor, replica_env
    from engine.config import load

    marker = tmp_path / "died-once"

    class DiesMidChunk(TeacherActor):
        """Writes garbage into half of validation chunk 2, then the process dies (once in all)."""

        def write(self, part, split, chunk, out):
            if split == "validation" and chunk == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return super().write(part, split, chunk, out)
                acts = zarr.open_group(part, mode="r+")[split]["activations"]
                lo = chunk * acts.chunks[0]
                acts[lo:lo + acts.chunks[0] // 2] = np.full((acts.chunks[0] // 2, *acts.shape[1:]), 7, np.float16)
                os._exit(1)
            return super().write(part, split, chunk, out)

    out = tmp_path / "run"
    cfg = load(REPO / "configs/tiny.yaml", extract_args(tiny_model, out)[2:] + ["extract.replicas=2"])
    run = pipeline.Run(cfg)
    run.check_inputs()
    runtime.init(cfg.ray)
    try:
        path = pipeline.extract(run, actor_cls=DiesMidChunk)
    finally:
        runtime.shutdown()
    assert marker.exists()
    assert_same_store(path, extract_reference)
    [log] = zarr.open_group(str(path), mode="r").attrs["extract_log"]
    assert log["replaced"] == 1 and log["retries"] >= 1
    done = [(name, c) for name, c, _, _ in log["chunks"]]
    assert len(done) == len(set(done))  # every chunk marked done exactly once
    assert ["validation", 2] in [[n, c] for n, c, _, tries in log["chunks"] if tries >= 1]
    assert sorted({r["replica"] for r in log["replicas"]}) == [0, 1]
    # Replicas on CPU keep the memory they free and share one malloc arena (recorded per replica).
    assert all(r["malloc"] == replica_env(0) for r in log["replicas"])
