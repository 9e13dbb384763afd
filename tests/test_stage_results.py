"""The probe and baseline stages' typed results (`engine.results.ProbeStage`, `BaselineStage`): made from
a committed artifact's (meta, arrays), a malformed one fails with one error naming the key, and the
report sections they give back are the artifact's meta, key for key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import artifacts
from engine.results import (
    PROBE_REPORT_KEYS,
    BaselineSection,
    BaselineStage,
    ProbesSection,
    ProbeStage,
    RunResults,
    check,
)

IDENT = {"probe": 1}


def _entry(layer, val, test):
    return {"family": "logreg", "combine": None, "layer": layer, "layers": [layer], "C": 0.1, "val_acc": val,
            "test_acc": test, "fit_seconds": 0.2, "read_seconds": 0.01, "n_train": 40}


def probe_artifact(pool: bool) -> tuple[dict, dict]:
    """A probe artifact's meta and arrays as pipeline.probe writes them."""
    sweep = [_entry(1, 0.4, 0.5), _entry(2, 0.6, 0.55)]
    meta = {"config": {"seed": 0}, "config_hash": "028fd3474796dc91", "stage_seconds": 5.4,
            "per_layer": sweep, "sweep": sweep, "best": {k: v for k, v in sweep[1].items() if k != "fit_seconds"},
            "temperature": 1.7, "oof_acc": 0.55, "ece_raw": 0.2, "ece_calibrated": 0.05, "test_ece_raw": 0.3,
            "test_ece_calibrated": 0.1, "seconds": {"sweep": 5.2, "crossfit": 0.1}}
    rng = np.random.default_rng(0)
    arrays = {"oof_probs": rng.dirichlet(np.ones(4), 40).astype(np.float32),
              "oof_probs_raw": rng.dirichlet(np.ones(4), 40).astype(np.float32),
              "test_probs": rng.dirichlet(np.ones(4), 30).astype(np.float32),
              "test_probs_calibrated": rng.dirichlet(np.ones(4), 30).astype(np.float32),
              "train_questions": np.arange(40)}
    if pool:
        meta |= {"n_pool": 20, "pool_acc": 0.5, "pool_ece": 0.1, "pool_ece_raw": 0.2}
        arrays |= {"pool_questions": np.arange(40, 60), "pool_probs": rng.dirichlet(np.ones(4), 20),
                   "pool_probs_raw": rng.dirichlet(np.ones(4), 20)}
    return meta, arrays


def baseline_meta(cross_check: bool, table: bool) -> dict:
    meta = {"n_questions": 8, "test_acc": 0.125, "tokens_per_s": 446.0, "startup_s": 14.5, "dtype": "float32",
            "config_hash": "028fd3474796dc91"}
    if cross_check:
        meta |= {"transformers_test_acc_same_questions": 0.125, "max_abs_diff_vs_transformers": 2.9e-06}
    if table:
        meta["brittleness"] = {"n_questions": 8, "probe": None, "rows": [], "spread": {"teacher": None, "probe": None},
                               "tokens_per_s": 100.0}
    meta["stage_seconds"] = 18.7
    return meta


@pytest.mark.parametrize("pool", [False, True])
def test_probe_stage_round_trips_a_saved_artifact(tmp_path, pool):
    meta, arrays = probe_artifact(pool)
    where = artifacts.save(tmp_path / "probes-1", IDENT, meta, arrays)
    found = artifacts.load(where, IDENT)
    stage = ProbeStage.from_artifact(*found, artifact=where)
    assert stage.artifact == str(where)
    for k in meta:
        if k != "config":
            assert getattr(stage, k) == meta[k], k
    for k in arrays:
        np.testing.assert_array_equal(getattr(stage, k), arrays[k])
    assert (stage.pool_questions is None) == (not pool) and (stage.n_pool is None) == (not pool)
    assert stage.meta == found[0]
    assert set(stage.meta) - {f for f in meta if f != "config"} == {"config", "identity", "identity_hash", "files"}
    # the report's probes section, as pipeline.report built it from the meta dict
    before = {k: found[0][k] for k in PROBE_REPORT_KEYS if k in found[0]}
    assert json.dumps(stage.to_report(), indent=2) == json.dumps(before, indent=2)
    check(ProbesSection, stage.to_report(), "probes")


@pytest.mark.parametrize("cross_check,table", [(False, False), (True, False), (True, True)])
def test_baseline_stage_round_trips_a_saved_artifact(tmp_path, cross_check, table):
    meta = baseline_meta(cross_check, table)
    # made now: the stage hands on the meta it wrote, which the report held as it was
    fresh = BaselineStage.from_meta(meta, artifact=tmp_path / "baseline-1")
    assert json.dumps(fresh.to_report(), indent=2) == json.dumps(meta, indent=2)
    # reused: read back, with the artifact's bookkeeping (identity, files), all of it in the report as before
    where = artifacts.save(tmp_path / "baseline-1", IDENT, meta, {"questions": np.arange(8), "logp": np.zeros((8, 4))})
    found, _ = artifacts.load(where, IDENT)
    stage = BaselineStage.from_meta(found, artifact=where)
    for k in meta:
        assert getattr(stage, k) == meta[k], k
    assert (stage.brittleness is None) == (not table)
    assert (stage.max_abs_diff_vs_transformers is None) == (not cross_check)
    assert json.dumps(stage.to_report(), indent=2) == json.dumps(found, indent=2)
    check(BaselineSection, stage.to_report(), "vllm_baseline")


def test_the_typed_sections_pass_the_report_check():
    meta, arrays = probe_artifact(pool=False)
    results = {"dataset": "arc_easy", "mode": "per_choice", "teacher": "t", "splits": {"test": 30},
               "teacher_logit": {"test_acc": 0.5}, "probes": ProbeStage.from_artifact(meta, arrays).to_report(),
               "vllm_baseline": BaselineStage.from_meta(baseline_meta(True, True)).to_report()}
    check(RunResults, results)


@pytest.mark.parametrize("change,key,why", [
    (lambda m, a: m.pop("oof_acc"), "oof_acc", "missing required key"),
    (lambda m, a: m.update(temperature="hot"), "temperature", "expected a number"),
    (lambda m, a: m.update(temperature=True), "temperature", "expected a number"),
    (lambda m, a: m.update(per_layer=[]), "per_layer", "expected a non-empty list"),
    (lambda m, a: m.update(sweep=[1]), "sweep[0]", "expected a dict"),
    (lambda m, a: m.update(best=[]), "best", "expected a dict"),
    (lambda m, a: m.update(config_hash=7), "config_hash", "expected a string"),
    (lambda m, a: m.update(n_pool="20"), "n_pool", "expected a number"),
    (lambda m, a: a.pop("oof_probs"), "oof_probs", "missing required key"),
])
def test_a_malformed_probe_artifact_is_one_error_naming_the_key(tmp_path, change, key, why):
    meta, arrays = probe_artifact(pool=True)
    change(meta, arrays)
    where = artifacts.save(tmp_path / "probes-1", IDENT, meta, arrays)
    with pytest.raises(ValueError) as err:
        ProbeStage.from_artifact(*artifacts.load(where, IDENT), artifact=where)
    assert str(err.value).startswith(f"probe artifact {where}: {key}: {why}"), str(err.value)


def test_probe_arrays_must_be_arrays():
    meta, arrays = probe_artifact(pool=True)
    with pytest.raises(ValueError, match=r"^probe artifact: pool_probs: expected an array, got list$"):
        ProbeStage.from_artifact(meta, arrays | {"pool_probs": [[0.5, 0.5]]})


@pytest.mark.parametrize("change,key,why", [
    (lambda m: m.pop("test_acc"), "test_acc", "missing required key"),
    (lambda m: m.update(n_questions="8"), "n_questions", "expected a number"),
    (lambda m: m.update(dtype=None), "dtype", "expected a string"),
    (lambda m: m.update(brittleness=[1]), "brittleness", "expected a dict"),
    (lambda m: m.update(max_abs_diff_vs_transformers="tiny"), "max_abs_diff_vs_transformers", "expected a number"),
])
def test_a_malformed_baseline_artifact_is_one_error_naming_the_key(tmp_path, change, key, why):
    meta = baseline_meta(True, True)
    change(meta)
    where = artifacts.save(tmp_path / "baseline-1", IDENT, meta, {})
    with pytest.raises(ValueError) as err:
        BaselineStage.from_meta(artifacts.load(where, IDENT)[0], artifact=where)
    assert str(err.value).startswith(f"baseline artifact {where}: {key}: {why}"), str(err.value)
    with pytest.raises(ValueError, match=f"^baseline artifact: {key.replace('[', '.').split('.')[0]}: "):
        BaselineStage.from_meta(meta)
