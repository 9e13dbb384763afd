"""`distill bench`: the cell configs (pure) and one small matrix end to end on the tiny model."""

from __future__ import annotations

import json
import zlib

import pytest

from engine.config import ConfigError, load
from tests.conftest import REPO, distill


def test_cell_config_pools_only_below_the_whole_train_split():
    from cluster.bench import cell_config, dataset_config

    cfg = load(REPO / "configs/bench.yaml")
    d = dataset_config(cfg, "aqua_rat")
    assert d.out_dir == "runs/bench/aqua_rat" and d.data.source == "../shared/data/aqua_rat"
    assert (d.data.train_split, d.data.validation_split, d.data.test_split) == ("validation", "test[:30%]", "test[30%:]")
    m = dataset_config(cfg, "mmlu").data
    assert (m.train_split, m.validation_split, m.test_split) == ("validation", "dev", "test")
    small = cell_config(d, 2, 0.1)
    assert small.seed == 2 and small.data.train_fraction == 0.1 and small.probe.label_pool
    assert small.student.label_sources == ("gold", "logit", "probe", "probe_pseudo")
    whole = cell_config(d, 2, 1.0)
    assert not whole.probe.label_pool and whole.student.label_sources == ("gold", "logit", "probe")
    hub = dataset_config(load(REPO / "configs/bench.yaml", ["bench.data_root=null"]), "arc_challenge").data
    assert hub.source == "allenai/ai2_arc" and hub.dataset == "arc_challenge"


@pytest.mark.parametrize("override, field", [
    ("bench.fractions=[0.1, 1.5]", "bench.fractions"),
    ("bench.sources=[gold, teacher]", "bench.sources"),
    ("bench.datasets=[squad]", "bench.datasets"),
    ("bench.seeds=[0, 0]", "bench.seeds"),
])
def test_bad_matrix_is_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(REPO / "configs/bench.yaml", [override])


@pytest.mark.slow
def test_bench_matrix_end_to_end_then_reused(tiny_model, tmp_path):
    """Two datasets x four sources x two fractions x two seeds on the tiny model; a rerun trains nothing,
    extracts nothing and writes the same cells."""
    out = tmp_path / "bench"
    args = ["bench", "configs/bench.yaml", f"teacher.model={tiny_model}", f"out_dir={out}",
            "extract.layers=[1, 2, 3, 4]", "extract.batch_size=16", "extract.chunk_rows=64",
            "data.max_train=24", "data.max_validation=16", "data.max_test=20",
            "probe.folds=3", "probe.max_iter=100", "probe.combine_layers=2",
            "student.epochs=1", "student.batch_size=8", "student.max_length=64", "student.cpus_per_worker=1",
            "bench.datasets=[arc_challenge, aqua_rat]", "bench.fractions=[0.5, 1.0]", "bench.seeds=[0, 1]",
            f"ray.temp_dir=/tmp/pkd-{zlib.crc32(str(out).encode()):08x}"]
    first = distill(*args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    res = json.loads((out / "bench.json").read_text())
    cells = res["cells"]
    # per dataset and seed: 3 sources at 100%, 4 at 50%
    assert len(cells) == 2 * 2 * (3 + 4)
    assert {(c["dataset"], c["source"], c["fraction"]) for c in cells if c["source"] == "probe_pseudo"} == {
        ("arc_challenge", "probe_pseudo", 0.5), ("aqua_rat", "probe_pseudo", 0.5)}
    for c in cells:
        assert 0.0 <= c["test_acc"] <= 1.0
    n_train = {(c["dataset"], c["source"], c["fraction"]): c["n_train"] for c in cells}
    assert n_train[("aqua_rat", "gold", 0.5)] == 12 and n_train[("aqua_rat", "gold", 1.0)] == 24
    assert n_train[("aqua_rat", "probe_pseudo", 0.5)] == 24  # the labelled half plus the pool
    assert len(res["summary"]) == 2 * (3 + 4) and all(r["n_seeds"] == 2 for r in res["summary"])
    assert set(res["refs"]) == {"arc_challenge", "aqua_rat"} and "torch" in res["versions"]
    md = (out / "bench.md").read_text()
    assert "### arc_challenge" in md and "### aqua_rat" in md
    for name in ("arc_challenge", "aqua_rat"):
        assert (out / f"bench_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name / "activations.zarr").is_dir()
    assert first.stdout.count("students to train") == 2  # one Ray Train run per dataset

    again = distill(*args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("0 of 14 students to train") == 2, again.stdout[-3000:]
    assert again.stdout.count("[extract] reusing") == 2 and "chunks (" not in again.stdout
    assert [c["test_acc"] for c in json.loads((out / "bench.json").read_text())["cells"]] == [c["test_acc"] for c in cells]
