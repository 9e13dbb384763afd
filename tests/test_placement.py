"""Replica placement on a simulated two-node cluster with logical GPUs (ray.cluster_utils.Cluster)."""

from __future__ import annotations

from collections import Counter

import pytest
import zarr
from conftest import REPO, assert_same_store, extract_args

from cluster import pipeline, runtime  # before ray loads: runtime sets Ray's environment (127.0.0.1 binding)
from cluster.extract import replica_env


@pytest.mark.slow
@pytest.mark.parametrize("placement, per_node", [("SPREAD", [2, 2]), ("STRICT_PACK", [4])])
def test_replicas_land_where_the_config_says(tmp_path, tiny_model, extract_reference, placement, per_node):
    import ray
    from ray.cluster_utils import Cluster

    from engine.config import load

    ray.shutdown()
    local = {"num_cpus": 4, "num_gpus": 4, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    cluster.add_node(**local)
    cluster.wait_for_nodes()
    out = tmp_path / "run"
    overrides = extract_args(tiny_model, out)[2:] + [
        f"ray.address={cluster.address}", "extract.replicas=4", "extract.cpus_per_replica=1",
        "extract.gpus_per_replica=1", f"extract.placement={placement}",
    ]
    cfg = load(REPO / "configs/tiny.yaml", overrides)
    run = pipeline.Run(cfg)
    run.check_inputs()
    try:
        runtime.init(cfg.ray)
        path = pipeline.extract(run)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        runtime.shutdown()
        cluster.shutdown()

    [log] = zarr.open_group(str(path), mode="r").attrs["extract_log"]
    replicas = log["replicas"]
    assert len(nodes) == 2 and {r["node"] for r in replicas} <= nodes
    assert sorted(Counter(r["node"] for r in replicas).values()) == per_node
    assert all(r["malloc"] == replica_env(1) == {"MALLOC_ARENA_MAX": "1"} for r in replicas)  # GPU: no kept memory
    for node in {r["node"] for r in replicas}:  # one logical GPU each, none shared on a node
        gpus = [g for r in replicas if r["node"] == node for g in r["gpus"]]
        assert all(len(r["gpus"]) == 1 for r in replicas) and len(gpus) == len(set(gpus))
    done = [(name, c) for name, c, _, _ in log["chunks"]]
    assert len(done) == len(set(done)) == sum(g["done"].shape[0] for _, g in zarr.open_group(str(path), mode="r").groups())
    assert len({rep for _, _, rep, _ in log["chunks"]}) > 1  # the queue fed more than one replica
    assert_same_store(path, extract_reference)
