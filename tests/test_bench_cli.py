"""`distill bench`: the cell configs (pure) and one small matrix end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest

from engine.config import ConfigError, load
from tests.conftest import REPO, distill


def test_cell_config_pools_only_below_the_whole_train_split():
    from cluster.bench import cell_config, dataset_config, regimes

    cfg = load(REPO / "configs/bench.yaml")
    d = dataset_config(cfg, "aqua_rat")
    assert d.out_dir == "runs/bench/aqua_rat" and d.data.source == "../shared/data/aqua_rat"
    assert (d.data.train_split, d.data.validation_split, d.data.test_split) == ("validation", "test[:30%]", "test[30%:]")
    m = dataset_config(cfg, "mmlu").data
    assert (m.train_split, m.validation_split, m.test_split) == ("validation", "dev", "test")
    small = cell_config(d, 2, 0.1)
    assert small.seed == 2 and small.data.train_fraction == 0.1 and small.probe.label_pool
    assert small.student.label_sources == ("gold", "logit", "probe", "gold+logit", "gold+probe", "probe_pseudo",
                                           "logit_pseudo")
    assert small.student.finetune == "head"
    whole = cell_config(d, 2, 1.0)
    assert not whole.probe.label_pool and whole.student.label_sources == ("gold", "logit", "probe", "gold+logit",
                                                                          "gold+probe")
    # the full slice's cell shares the matrix cell's probe sweep (the same pool), in its own regime
    sliced = cell_config(d, 2, 0.1, finetune="full", sources=("gold", "probe"))
    assert sliced.probe == small.probe and sliced.student.finetune == "full"
    assert sliced.student.label_sources == ("gold", "probe")
    assert [r[0] for r in regimes(cfg, "arc_easy")] == ["head", "full"] and len(regimes(cfg, "mmlu")) == 1
    hub = dataset_config(load(REPO / "configs/bench.yaml", ["bench.data_root=null"]), "arc_challenge").data
    assert hub.source == "allenai/ai2_arc" and hub.dataset == "arc_challenge"


def test_mmlu_test_sample_keeps_every_subject_share():
    from collections import Counter

    from cluster.bench import dataset_config
    from engine.tasks import load_role

    data = dataset_config(load(REPO / "configs/bench.yaml"), "mmlu").data
    sample = load_role(data, "test")
    whole = load_role(dataclasses.replace(data, max_test=None), "test")
    assert len(sample) == 2400 and len(whole) == 14042
    got, want = Counter(ex.subject for ex in sample), Counter(ex.subject for ex in whole)
    assert set(got) == set(want)
    assert all(abs(got[s] - 2400 * want[s] / 14042) <= 2.5 for s in want)  # each subject's share, to rounding


@pytest.mark.parametrize("override, field", [
    ("bench.fractions=[0.1, 1.5]", "bench.fractions"),
    ("bench.sources=[gold, teacher]", "bench.sources"),
    ("bench.datasets=[squad]", "bench.datasets"),
    ("bench.seeds=[0, 0]", "bench.seeds"),
    ("bench.slice_datasets=[squad]", "bench.slice_datasets"),
    ("bench.finetune=partly", "bench.finetune"),
    ("bench.parallel_runs=0", "bench.parallel_runs"),
    ("student.mix_alpha=1.0", "student.mix_alpha"),
])
def test_bad_matrix_is_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(REPO / "configs/bench.yaml", [override])


@pytest.mark.slow
def test_bench_matrix_end_to_end_then_reused(tiny_model, tmp_path):
    """Two datasets x six sources x two fractions x two seeds as heads, plus a full fine-tuning slice, on
    the tiny model; a rerun trains nothing, extracts nothing and writes the same cells."""
    out = tmp_path / "bench"
    args = ["bench", "configs/bench.yaml", f"teacher.model={tiny_model}", f"out_dir={out}",
            "extract.layers=[1, 2, 3, 4]", "extract.batch_size=16", "extract.chunk_rows=64",
            "data.max_train=24", "data.max_validation=16", "data.max_test=20",
            "probe.folds=3", "probe.max_iter=100", "probe.combine_layers=2",
            "student.model=teacher", "student.epochs=1", "student.head_epochs=10", "student.batch_size=8",
            "student.max_length=64", "student.cpus_per_worker=1", "student.lr=1e-3",
            "bench.datasets=[arc_challenge, aqua_rat]", "bench.fractions=[0.5, 1.0]", "bench.seeds=[0, 1]",
            "bench.sources=[gold, logit, probe, gold+probe, probe_pseudo, logit_pseudo]",
            "bench.slice_datasets=[arc_challenge]", "bench.slice_fractions=[1.0]", "bench.slice_sources=[gold, probe]",
            "bench.slice_seeds=[0]", "bench.resamples=200",
            f"ray.temp_dir=/tmp/pkd-{zlib.crc32(str(out).encode()):08x}"]
    first = distill(*args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    res = json.loads((out / "bench.json").read_text())
    cells = res["cells"]
    heads = [c for c in cells if c["regime"] == "head"]
    full = [c for c in cells if c["regime"] == "full"]
    # per dataset and seed: 4 sources at 100%, 6 at 50% (the pseudo pair needs a pool)
    assert len(heads) == 2 * 2 * (4 + 6)
    assert sorted((c["dataset"], c["source"], c["fraction"], c["seed"]) for c in full) == [
        ("arc_challenge", "gold", 1.0, 0), ("arc_challenge", "probe", 1.0, 0)]
    assert {(c["dataset"], c["fraction"]) for c in cells if "pseudo" in c["source"]} == {
        ("arc_challenge", 0.5), ("aqua_rat", 0.5)}
    for c in cells:
        assert 0.0 <= c["test_acc"] <= 1.0
    n_train = {(c["dataset"], c["source"], c["fraction"]): c["n_train"] for c in heads}
    assert n_train[("aqua_rat", "gold", 0.5)] == 12 and n_train[("aqua_rat", "gold", 1.0)] == 24
    assert n_train[("aqua_rat", "probe_pseudo", 0.5)] == n_train[("aqua_rat", "logit_pseudo", 0.5)] == 24
    assert len(res["summary"]) == 2 * (4 + 6) + 2
    assert all(r["n_seeds"] == (2 if r["regime"] == "head" else 1) for r in res["summary"])
    assert all(r["lo"] <= r["mean"] <= r["hi"] for r in res["summary"])
    pairs = {(p["dataset"], p["regime"], p["fraction"], p["a"], p["b"]) for p in res["pairs"]}
    assert ("aqua_rat", "head", 0.5, "probe_pseudo", "logit_pseudo") in pairs
    assert ("arc_challenge", "full", 1.0, "probe", "gold") in pairs
    assert all(len(p["per_seed"]) == p["n_seeds"] for p in res["pairs"])
    assert set(res["refs"]) == {"arc_challenge", "aqua_rat"} and "torch" in res["versions"]
    assert res["dtypes"]["teacher"]["dtype"] in ("float32", "bfloat16")
    md = (out / "bench.md").read_text()
    assert "### arc_challenge" in md and "### aqua_rat" in md and "## Verdicts" in md
    assert "**Student regime `head`** (2 seeds)" in md and "**Student regime `full`** (1 seeds)" in md
    for name in ("arc_challenge", "aqua_rat"):
        for png in (f"bench_{name}.png", f"bench_{name}_diff.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name / "activations.zarr").is_dir()
    assert first.stdout.count("students to train") == 2

    again = distill(*args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "0 of 22 students to train" in again.stdout and "0 of 20 students to train" in again.stdout, again.stdout[-3000:]
    assert again.stdout.count("[extract] reusing") == 2 and "chunks (" not in again.stdout
    assert [c["test_acc"] for c in json.loads((out / "bench.json").read_text())["cells"]] == [c["test_acc"] for c in cells]
