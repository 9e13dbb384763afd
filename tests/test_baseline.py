"""vLLM baseline scores equal a transformers fp32 reference to 1e-4: choice log-likelihoods from
`prompt_logprobs` (per-choice) and label log-probabilities from one generated token (letter, in two
answer formats, one whose labels share a leading '(' token).

One vLLM actor (start-up ~20 s inside Ray on 2 shared CPU cores) serves every case; a second test
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
from cluster.runtime import KEEP_MEMORY_ENV
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
    out = {m: build_sequences(examples, tok, PromptConfig(mode=m)) for m in ("per_choice", "letter")}
    out["letter_paren"] = build_sequences(examples, tok, PromptConfig(mode="letter", answer_format="({letter})"))
    return out


def reference(model_dir, seqs: Sequences) -> np.ndarray:
    """transformers fp32. Per-choice: (R,) sum of log-softmax over each choice's tokens. Letter:
    (Q, C_max) log-softmax of each label token at the prompt's last position, -inf if absent."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        if seqs.mode == "letter":
            for q, ids in enumerate(seqs.ids):
                lp = torch.log_softmax(model(torch.tensor([ids.tolist()])).logits[0, -1].double(), -1)
                row = lp[torch.as_tensor(seqs.letter_ids)].numpy()
                out.append(np.where(np.arange(len(row)) < seqs.n_choices[q], row, -np.inf))
            return np.asarray(out)
        for prefix, cont in build_pairs(seqs):
            ids = torch.tensor([prefix + cont])
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = torch.arange(len(prefix), len(prefix) + len(cont))
            out.append(lp[pos - 1, ids[0, pos]].sum().item())
    return np.asarray(out)


def test_scores_match_transformers(local_ray, tiny_model, seqs):
    per = seqs["per_choice"]
    actor = start_scorer(str(tiny_model), CFG, model_len_for(*seqs.values()), num_cpus=2)
    try:
        res = {k: score_sequences(str(tiny_model), v, CFG, num_cpus=2, scorer=actor) for k, v in seqs.items()}
        malloc = ray.get(actor.malloc.remote())
    finally:
        ray.kill(actor)
    assert malloc == KEEP_MEMORY_ENV  # on CPU the scorer keeps the memory it frees
    wait_cpus_free()

    assert res["per_choice"].scores.shape == (per.n_rows,)
    np.testing.assert_allclose(res["per_choice"].scores, reference(tiny_model, per), atol=1e-4)
    assert res["per_choice"].n_tokens == int(per.lengths().sum()) and res["per_choice"].tokens_per_s > 0

    for key in ("letter", "letter_paren"):
        let = seqs[key]
        assert res[key].scores.shape == (let.n_questions, let.max_choices) and res[key].n_prompts == let.n_questions
        present = np.arange(let.max_choices)[None, :] < let.n_choices[:, None]
        assert np.isneginf(res[key].scores[~present]).all() and np.isfinite(res[key].scores[present]).all()
        np.testing.assert_allclose(res[key].scores, reference(tiny_model, let), atol=1e-4)
    # '(A)': the prompt ends with the labels' shared '(' token, and the letters are scored after it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert all(tok.decode(ids[-1:]).strip() == "(" for ids in seqs["letter_paren"].ids)


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


@pytest.mark.parametrize("bar", ["1", "0"])
def test_scoring_in_chunks_keeps_the_order(local_ray, monkeypatch, capsys, bar):
    """The prompts go as several calls queued at once (a bar counts them); the scores come back in order."""
    import cluster.baseline as baseline

    monkeypatch.setenv("DISTILL_PROGRESS", bar)
    monkeypatch.setattr(baseline, "SCORE_MIN_CHUNK", 2)
    calls = []

    def call(part):
        calls.append(len(part))
        return ray.put(np.asarray(part, dtype=np.float64) * 10)

    got = baseline._in_chunks(list(range(7)), call, quiet=False)
    assert calls == [2, 2, 2, 1] and got.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert ("[baseline]" in capsys.readouterr().out) == (bar == "1")
    assert baseline._in_chunks([], call, quiet=False).shape == (0,)
