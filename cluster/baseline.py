"""Teacher baselines with vLLM, scored inside a Ray actor.

* Letter mode: one request per question, one generated token, and the log-probabilities vLLM
  returns for exactly the label tokens (`logprob_token_ids`), normalised over the whole vocabulary.
* Per-choice mode: the sum of the choice text's log-probabilities, from `prompt_logprobs`.

vLLM lives in an actor killed after use (the interpreter may abort at exit once vLLM ran). Callers
normalise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from cluster import runtime
from engine.config import BaselineConfig
from engine.log import Progress, log, progress
from engine.modes import prompt_mode
from engine.sequences import Sequences

Pair = tuple[list[int], list[int]]
SCORE_CALLS = 20
"""The scoring is sent as about this many vLLM calls, for a progress bar; all are queued on the actor at
once, so it never waits between them, and each batches its prompts as vLLM likes."""
SCORE_MIN_CHUNK = 512
"""No call gets fewer prompts than this (but the last): a smaller chunk loses batching to the call's tail."""


NOISE = ("NUMA binding: Using MEMBIND policy",)
"""Lines vLLM's start writes straight to the process's stderr (C++ warnings, which no logging level
reaches) and the console does without unless --verbose."""


@contextlib.contextmanager
def stderr_without(noise: Sequence[str]):
    """Hold back what this process writes to its stderr (file descriptor 2, so C++ writes too) while
    the block runs, then write it out without the lines containing any of `noise`. A failing block gets
    its whole stderr back, noise included."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(x for x in lines if failed or not any(n in x for n in noise))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class VLLMScorer:
    """Holds one `vllm.LLM`; use as a Ray actor via `start_scorer` (vLLM is imported only in here)."""

    def __init__(self, model_dir: str, cfg: BaselineConfig, max_model_len: int) -> None:
        t0 = time.perf_counter()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # Engine core in this process, so killing the actor frees everything.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings reach the console with --verbose only
        if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR":
            warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside vLLM's imports
            # Its import warns (Triton without a CPU backend) before it applies VLLM_LOGGING_LEVEL.
            logging.getLogger("vllm").setLevel(logging.ERROR)
        with stderr_without(NOISE if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" else ()):
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
                use_tqdm_on_load=os.environ["VLLM_LOGGING_LEVEL"] != "ERROR",  # its weight-loading bar: --verbose only
            )
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> float:
        return self.startup_s

    def malloc(self) -> dict[str, str]:
        """The glibc settings this actor (and the engine process it starts) runs with."""
        return runtime.malloc_settings()

    def letters(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int]) -> np.ndarray:
        """(Q, len(letter_ids)) float64: log p(label token | prompt) from one generated token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [int(t) for t in letter_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                 use_tqdm=False)
        # logprobs[0] maps each requested id (and the sampled one) to its Logprob at the first new token.
        return np.array([[o.outputs[0].logprobs[0][t].logprob for t in ids] for o in outs], dtype=np.float64)

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


def build_pairs(seqs: Sequences) -> list[Pair]:
    """Per-choice mode: (prefix, choice text) per row."""
    return [(s[: int(b)].tolist(), s[int(b) :].tolist()) for s, b in zip(seqs.ids, seqs.start)]


def mask_absent(seqs: Sequences, scores: np.ndarray) -> np.ndarray:
    """(Q, C_max) letter scores with -inf beyond each question's choices."""
    present = np.arange(scores.shape[1])[None, :] < seqs.n_choices[:, None]
    return np.where(present, scores, -np.inf)


def model_len_for(*seqs: Sequences) -> int:
    """max_model_len: longest row + 1 (label token or the one generated token), rounded up to 32."""
    longest = max((int(s.lengths().max()) for s in seqs if s.n_rows), default=1)
    return -(-(longest + 1) // 32) * 32


def start_scorer(
    model_dir: str, cfg: BaselineConfig, max_model_len: int, *, num_cpus: int, num_gpus: float = 0
) -> Any:
    """Start a `VLLMScorer` actor with these resources and wait until its engine is up. On CPU it keeps
    the memory it frees (`cluster.runtime.KEEP_MEMORY_ENV`)."""
    env = runtime.compute_env(bool(num_gpus), one_arena=False)  # measured without it
    actor = ray.remote(VLLMScorer).options(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env})
    actor = actor.remote(str(model_dir), cfg, max_model_len)
    try:
        ray.get(actor.ready.remote())
    except BaseException:
        ray.kill(actor)
        raise
    return actor


def score_sequences(
    model_dir: str, seqs: Sequences, cfg: BaselineConfig, *, num_cpus: int, num_gpus: float = 0,
    scorer: Any = None, quiet: bool = False,
) -> ScoreResult:
    """Score `seqs` with the teacher in vLLM, by `seqs.mode` (Ray must be initialised).

    Starts a scorer actor (on GPU pass num_gpus=cfg.tensor_parallel_size) and kills it afterwards,
    unless `scorer` (from `start_scorer`) is given: that actor is used and left running.
    """
    letter, own = prompt_mode(seqs.mode).has_letter_labels, scorer is None  # label tokens, or continuations
    try:
        if own:
            scorer = start_scorer(model_dir, cfg, model_len_for(seqs), num_cpus=num_cpus, num_gpus=num_gpus)
        startup_s = ray.get(scorer.ready.remote())
        t0 = time.perf_counter()
        if letter:
            prompts = [x.tolist() for x in seqs.ids]
            letter_ids = seqs.letter_ids.tolist()
            flat = _in_chunks(prompts, lambda part: scorer.letters.remote(part, letter_ids), quiet) if prompts else np.zeros((0, 0))
        else:
            flat = _in_chunks(build_pairs(seqs), scorer.score.remote, quiet)
        score_s = time.perf_counter() - t0
    finally:
        if own and scorer is not None:
            ray.kill(scorer)
    n_tokens = int(seqs.lengths().sum())
    scores = mask_absent(seqs, flat) if letter else flat
    res = ScoreResult(scores, seqs.n_rows, n_tokens, score_s, startup_s)
    if not quiet:
        log("baseline", f"vLLM: {n_tokens} tokens in {score_s:.2f}s = {res.tokens_per_s:.0f} tok/s")
    return res


def _in_chunks(items: list, call, quiet: bool) -> np.ndarray:
    """`call(items)` as chunks of at least SCORE_MIN_CHUNK items (all queued on the actor at once),
    concatenated in order, with a progress bar over the items scored (none if `quiet`)."""
    size = max(SCORE_MIN_CHUNK, -(-len(items) // SCORE_CALLS))
    spans = [(lo, min(lo + size, len(items))) for lo in range(0, len(items), size)] or [(0, 0)]
    refs = [call(items[lo:hi]) for lo, hi in spans]
    parts = []
    with contextlib.nullcontext(Progress(None)) if quiet else progress("baseline", len(items), "prompt") as bar:
        for ref, (lo, hi) in zip(refs, spans):
            parts.append(ray.get(ref))
            bar.update(hi - lo)
    return np.concatenate(parts)
