"""vLLM baseline scores equal a transformers fp32 reference, in per-choice and letter mode.

One vLLM actor (start-up ~20 s inside Ray on 2 shared CPU cores) serves both modes; a second test
checks that `score_sequences` starts and kills its own actor. The module takes 70-90 s: slow.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

# Ray 2.60 on Linux rewrites _node_ip_address="127.0.0.1" to the host's IP unless this is 0.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray
import torch

from cluster.baseline import build_pairs, model_len_for, score_sequences, start_scorer
from engine.config import BaselineConfig, PromptConfig
from engine.sequences import Sequences, build_sequences
from engine.tasks import Example

pytestmark = pytest.mark.slow

CFG = BaselineConfig(dtype="float32", kv_cache_gb=1)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def seqs(tiny_model, shared_data) -> dict[str, Sequences]:
    from transformers import AutoTokenizer

    with open(shared_data / "arc_easy" / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(6)]
    examples = [Example(r["id"], r["question"], tuple(r["choices"]), r["answer"]) for r in rows]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return {m: build_sequences(examples, tok, PromptConfig(mode=m)) for m in ("per_choice", "letter")}


def reference(model_dir, seqs: Sequences) -> np.ndarray:
    """transformers fp32: sum of log-softmax at each continuation token, in `build_pairs` order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prefix, cont in build_pairs(seqs):
            ids = torch.tensor([prefix + cont])
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = torch.arange(len(prefix), len(prefix) + len(cont))
            out.append(lp[pos - 1, ids[0, pos]].sum().item())
    return np.asarray(out)


def test_scores_match_transformers(local_ray, tiny_model, seqs):
    per, let = seqs["per_choice"], seqs["letter"]
    actor = start_scorer(str(tiny_model), CFG, model_len_for(per, let), num_cpus=2)
    try:
        res_per = score_sequences(str(tiny_model), per, CFG, num_cpus=2, scorer=actor)
        res_let = score_sequences(str(tiny_model), let, CFG, num_cpus=2, scorer=actor)
    finally:
        ray.kill(actor)
    wait_cpus_free()

    assert res_per.scores.shape == (per.n_rows,)
    np.testing.assert_allclose(res_per.scores, reference(tiny_model, per), atol=1e-4)
    assert res_per.n_tokens == int(per.lengths().sum()) and res_per.tokens_per_s > 0

    assert res_let.scores.shape == (let.n_questions, let.max_choices)
    present = np.arange(let.max_choices)[None, :] < let.n_choices[:, None]
    assert np.isneginf(res_let.scores[~present]).all()
    np.testing.assert_allclose(res_let.scores[present], reference(tiny_model, let), atol=1e-4)


def wait_cpus_free(timeout: float = 30.0) -> None:
    """The killed actor's CPUs come back (released asynchronously)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"actor CPUs not released: {ray.available_resources()}"
        time.sleep(0.2)


def test_score_sequences_owns_its_actor(local_ray, tiny_model, seqs):
    sub = seqs["letter"].select(np.arange(2))
    res = score_sequences(str(tiny_model), sub, CFG, num_cpus=2)
    assert res.scores.shape == (2, sub.max_choices) and np.isfinite(res.scores[:, :3]).all()
    wait_cpus_free()
