"""Teacher baseline with vLLM: sum of continuation log-probabilities, scored inside a Ray actor.

vLLM lives in an actor killed after use (the interpreter may abort at exit once vLLM ran). Per-choice
mode scores each row's choice text; letter mode each label token after 'Answer:'. Callers normalise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from engine.config import BaselineConfig
from engine.sequences import Sequences

Pair = tuple[list[int], list[int]]


class VLLMScorer:
    """Holds one `vllm.LLM`; use as a Ray actor via `start_scorer` (vLLM is imported only in here)."""

    def __init__(self, model_dir: str, cfg: BaselineConfig, max_model_len: int) -> None:
        t0 = time.perf_counter()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # Engine core in this process, so killing the actor frees everything.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(
            model=model_dir,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=True,
            enable_prefix_caching=True,  # note: requests with prompt_logprobs skip cache reads
            skip_tokenizer_init=True,
        )
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> float:
        return self.startup_s

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        """(N,) float64: sum of log p(cont_t | prefix, cont_<t) for each (prefix_ids, cont_ids)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p] + [int(t) for t in c]) for p, c in pairs]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = np.empty(len(pairs), dtype=np.float64)
        for i, (out, (prefix, _)) in enumerate(zip(outs, pairs)):
            # prompt_logprobs[0] is None; entry j maps ids[j] (and nothing else, at 0) to its Logprob.
            ids, lps = out.prompt_token_ids, out.prompt_logprobs
            scores[i] = sum(lps[j][ids[j]].logprob for j in range(len(prefix), len(ids)))
        return scores


@dataclass
class ScoreResult:
    """`scores`: (R,) per-choice, or (Q, C_max) letter with -inf for absent choices. `n_tokens`: prompt
    tokens sent (prefix + continuation); `score_s`: wall time of scoring; `startup_s`: engine start-up."""

    scores: np.ndarray
    n_prompts: int
    n_tokens: int
    score_s: float
    startup_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.score_s, 1e-9)


def build_pairs(seqs: Sequences, letter: bool | None = None) -> list[Pair]:
    """Per-choice: (prefix, choice text) per row. Letter: (prompt, [label id]) per (question, choice)."""
    if not (seqs.mode == "letter" if letter is None else letter):
        return [(s[: int(b)].tolist(), s[int(b) :].tolist()) for s, b in zip(seqs.ids, seqs.start)]
    return [
        (seqs.ids[r].tolist(), [int(seqs.letter_ids[c])])
        for r in range(seqs.n_rows)
        for c in range(int(seqs.n_choices[seqs.row_question[r]]))
    ]


def shape_scores(seqs: Sequences, flat: np.ndarray, letter: bool | None = None) -> np.ndarray:
    """Flat scores in `build_pairs` order -> (R,) per-choice, or (Q, C_max) letter (-inf where absent)."""
    if not (seqs.mode == "letter" if letter is None else letter):
        return flat
    out = np.full((seqs.n_questions, seqs.max_choices), -np.inf)
    q = np.repeat(seqs.row_question, seqs.n_choices[seqs.row_question])
    c = np.concatenate([np.arange(n) for n in seqs.n_choices[seqs.row_question]]) if len(q) else q
    out[q, c] = flat
    return out


def model_len_for(*seqs: Sequences) -> int:
    """max_model_len: longest row + 1 (label token or the one generated token), rounded up to 32."""
    longest = max((int(s.lengths().max()) for s in seqs if s.n_rows), default=1)
    return -(-(longest + 1) // 32) * 32


def start_scorer(
    model_dir: str, cfg: BaselineConfig, max_model_len: int, *, num_cpus: int, num_gpus: float = 0
) -> Any:
    """Start a `VLLMScorer` actor with these resources and wait until its engine is up."""
    actor = ray.remote(VLLMScorer).options(num_cpus=num_cpus, num_gpus=num_gpus)
    actor = actor.remote(str(model_dir), cfg, max_model_len)
    try:
        ray.get(actor.ready.remote())
    except BaseException:
        ray.kill(actor)
        raise
    return actor


def score_sequences(
    model_dir: str, seqs: Sequences, cfg: BaselineConfig, *, num_cpus: int, num_gpus: float = 0,
    letter: bool | None = None, scorer: Any = None,
) -> ScoreResult:
    """Score `seqs` with the teacher in vLLM (Ray must be initialised). `letter=None` follows `seqs.mode`.

    Starts a scorer actor (on GPU pass num_gpus=cfg.tensor_parallel_size) and kills it afterwards,
    unless `scorer` (from `start_scorer`) is given: that actor is used and left running.
    """
    pairs, own = build_pairs(seqs, letter), scorer is None
    try:
        if own:
            scorer = start_scorer(model_dir, cfg, model_len_for(seqs), num_cpus=num_cpus, num_gpus=num_gpus)
        startup_s = ray.get(scorer.ready.remote())
        t0 = time.perf_counter()
        flat = ray.get(scorer.score.remote(pairs))
        score_s = time.perf_counter() - t0
    finally:
        if own and scorer is not None:
            ray.kill(scorer)
    n_tokens = sum(len(p) + len(c) for p, c in pairs)
    res = ScoreResult(shape_scores(seqs, flat, letter), len(pairs), n_tokens, score_s, startup_s)
    print(f"vLLM baseline: {n_tokens} tokens in {score_s:.2f}s = {res.tokens_per_s:.0f} tok/s")
    return res
