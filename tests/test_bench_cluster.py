"""The benchmark on a cluster: cells train at the same time on a simulated two-node cluster
(ray.cluster_utils), and a matrix killed mid-way resumes without redoing the cells it finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from cluster import runtime  # noqa: F401  (sets Ray's environment before ray is imported)
from tests.conftest import REPO, distill


def bench_args(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    """A matrix of one dataset, 2 seeds x 2 sources at 100%, heads on the tiny model, 2 runs at once."""
    return [f"teacher.model={tiny_model}", f"out_dir={out}", "teacher.dtype=float32", "student.dtype=float32",
            "extract.layers=[1, 2, 3, 4]", "extract.batch_size=16", "extract.chunk_rows=64", "extract.cpus_per_replica=1",
            "data.max_train=24", "data.max_validation=16", "data.max_test=20",
            "probe.folds=3", "probe.max_iter=100", "probe.combine_layers=2",
            "student.model=teacher", "student.head_epochs=20", "student.batch_size=8", "student.max_length=64",
            "student.cpus_per_worker=1", "bench.datasets=[aqua_rat]", "bench.fractions=[1.0]", "bench.seeds=[0, 1]",
            "bench.sources=[gold, probe]", "bench.slice_datasets=[]", "bench.parallel_runs=2", "bench.resamples=200",
            f"ray.temp_dir=/tmp/pkd-{zlib.crc32(str(out).encode()):08x}", *extra]


@pytest.mark.slow
def test_cells_train_concurrently_on_two_nodes(tmp_path, tiny_model):
    """Each node has one CPU and each Ray Train run one 1-CPU worker, so two runs whose fit() overlap in
    time ran on the two nodes at once."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.bench import run_bench
    from engine.config import load

    ray.shutdown()
    local = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    cluster.add_node(**local)
    cluster.wait_for_nodes()
    cfg = load(REPO / "configs/bench.yaml", bench_args(tiny_model, tmp_path / "bench", f"ray.address={cluster.address}"))
    try:
        runtime.init(cfg.ray)
        res = run_bench(cfg)
    finally:
        runtime.shutdown()
        cluster.shutdown()
    cells = res["cells"]
    assert sorted((c["seed"], c["source"]) for c in cells) == [(0, "gold"), (0, "probe"), (1, "gold"), (1, "probe")]
    metas = [json.loads((Path(c["artifact"]) / "meta.json").read_text()) for c in cells]
    runs = {m["ray_train_run"]: tuple(m["fit_window"]) for m in metas}
    assert len(runs) == 2, runs  # one run per cell (seed), both cells' students together
    by_seed = {}
    for c, m in zip(cells, metas, strict=True):
        by_seed.setdefault(c["seed"], set()).add(m["ray_train_run"])
    assert all(len(v) == 1 for v in by_seed.values()) and by_seed[0] != by_seed[1]
    (s1, e1), (s2, e2) = runs.values()
    assert max(s1, s2) < min(e1, e2), f"the two runs did not overlap: {runs}"
    assert {r["source"] for r in res["summary"]} == {"gold", "probe"}
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("probe", "gold")] and res["pairs"][0]["n_seeds"] == 2


@pytest.mark.slow
def test_matrix_killed_mid_way_resumes_without_redoing_finished_cells(tmp_path, tiny_model):
    """SIGKILL `distill bench` (driver, Ray and workers) once a cell's students are committed; the rerun
    reuses them untouched and trains only what is missing."""
    out = tmp_path / "bench"
    args = ["bench", "configs/bench.yaml", *bench_args(tiny_model, out, "ray.num_cpus=2")]
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "saved as a model folder" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    log = "".join(lines)
    assert "wrote" not in log and "saved as a model folder" in log, log[-3000:]
    students = out / "aqua_rat" / "students"
    done = {p: p.stat().st_mtime_ns for p in students.glob("*/meta.json")}
    assert 1 <= len(done) <= 4, log[-3000:]

    time.sleep(1)
    again = distill(*args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"{4 - len(done)} of 4 students to train" in again.stdout, again.stdout[-3000:]
    assert again.stdout.count("[train] reusing") == len(done)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished cells untouched
    res = json.loads((out / "bench.json").read_text())
    assert len(res["cells"]) == 4 and len(list(students.glob("*/meta.json"))) == 4
