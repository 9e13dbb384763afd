"""Where the per-choice teacher forward's time goes, and what other attention or compilation would gain.

    .venv/bin/python bench/forward_variants.py              # prints, writes bench/results/forward_variants.json
    .venv/bin/python bench/forward_variants.py --no-compile # without the torch.compile variant (2 min less)

On `--questions` ARC-Easy train questions in per-choice mode (packed as the engine packs them), in the
dtype `teacher.dtype: auto` picks, with the teacher replicas' glibc settings (the script re-runs itself
with `cluster.runtime.KEEP_MEMORY_ENV` when they are not set):
  1. profile: torch.profiler over one `engine.teacher.forward_rows` pass (after a warm pass): each
     operator's share of the time, and the model's matmuls' GFLOP/s inside the forward against the
     same shapes timed alone and against `matmul_gflops` (the GEMM share's ceiling);
  2. variants, in alternating passes of `forward_rows`: the model as loaded (SDPA attention), HF's eager
     attention, and a grouped-query attention written as two batched matmuls (registered through
     transformers' `AttentionInterface`), with their outputs' largest difference from SDPA's;
  3. with `--compile` (the default): the decoder under `torch.compile(dynamic=True)`, no hooks, all
     hidden states returned, against the same call eager: the first pass (compilation) and the next ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.runtime import KEEP_MEMORY_ENV  # noqa: E402
from engine.config import DataConfig, PromptConfig, TeacherConfig  # noqa: E402
from engine.hardware import forward_flops_per_token, free_page_reporting, kernel_isa, matmul_flags, matmul_gflops, pick_dtype  # noqa: E402
from engine.models import load_tokenizer, resolve_model  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.tasks import load_split  # noqa: E402
from engine.teacher import _batch, forward_rows, length_batches, pack_units  # noqa: E402

OUT = Path(__file__).parent / "results" / "forward_variants.json"
DATA = REPO.parent / "shared" / "data" / "arc_easy"


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_):
    """Attention with K/V heads shared by groups of query heads, as two batched matmuls: the queries of a
    group are stacked, so K and V are never repeated. Boolean or additive masks; eval only."""
    B, H, T, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    scores = torch.matmul(query.reshape(B, KV, (H // KV) * T, D), key.transpose(-1, -2)).view(B, KV, H // KV, T, S)
    scores = scores * (D ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        m = attention_mask[:, :, None, :, :S]
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min) if m.dtype == torch.bool else scores + m
    p = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype).view(B, KV, (H // KV) * T, S)
    return torch.matmul(p, value).view(B, H, T, D).transpose(1, 2).contiguous(), None


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gemm_alone(m: int, k: int, n: int, dtype, reps: int = 10) -> float:
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(a, w)
    best = min(timed(lambda: [torch.nn.functional.linear(a, w) for _ in range(reps)]) for _ in range(5))
    return reps * 2 * m * k * n / best / 1e9


def profile(model, seqs, rows, pad, dtype) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    layers = list(range(1, model.config.num_hidden_layers + 1))
    forward_rows(model, seqs, rows, layers, pad_id=pad)
    with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        forward_rows(model, seqs, rows, layers, pad_id=pad)
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda x: -x[1])[:10]
    # the blocks' matmuls (K and N below the vocabulary), their FLOPs over their time
    flops = us = 0.0
    shapes: dict[tuple, float] = {}
    for e in p.events():
        if e.name == "aten::mm" and e.input_shapes and len(e.input_shapes[0]) == 2:
            (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
            if n < model.config.vocab_size:
                flops += 2.0 * m * k * n
                us += e.self_cpu_time_total
                shapes[(k, n)] = shapes.get((k, n), 0) + 1
    batches = length_batches(pack_units(seqs, rows), 32, float(seqs.lengths().mean()))
    m_typ = int(np.median([sum(len(u.tokens) for u in b) for b in batches]))
    alone = {f"{k}x{n}": round(gemm_alone(m_typ, k, n, dtype), 1) for (k, n) in sorted(shapes)}
    return {"operator_shares": [[k, round(s, 3)] for k, s in shares],
            "block_matmuls_gflops_in_forward": round(flops / us / 1e3, 1),
            "block_matmul_shapes_alone_gflops": alone, "tokens_per_batch_median": m_typ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if any(os.environ.get(k) != v for k, v in KEEP_MEMORY_ENV.items()):  # glibc reads them at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_MEMORY_ENV})
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("grouped", grouped_attention)
    dtype_name, why = pick_dtype("auto", gpu=False)
    dtype = getattr(torch, dtype_name)
    path = resolve_model(TeacherConfig())
    tok = load_tokenizer(path)
    seqs = build_sequences(load_split(DataConfig(source=str(DATA)), "train")[: args.questions], tok,
                           PromptConfig(mode="per_choice"))
    rows, pad = np.arange(seqs.n_rows), tok.pad_token_id
    models = {impl: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager", "grouped")}
    layers = list(range(1, models["sdpa"].config.num_hidden_layers + 1))
    gemm = max(matmul_gflops(dtype_name, reps=10) for _ in range(3))
    per_token = forward_flops_per_token(models["sdpa"], 0.5 * float(seqs.lengths().mean()))
    res: dict = {"command": " ".join(["python", "bench/forward_variants.py", *sys.argv[1:]]),
                 "questions": args.questions, "rows": seqs.n_rows, "dtype": dtype_name, "dtype_why": why,
                 "gemm_gflops": round(gemm, 1),
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": matmul_flags(),
                             "kernel_isa": kernel_isa(), "free_page_reporting": free_page_reporting()},
                 "malloc": {k: os.environ[k] for k in KEEP_MEMORY_ENV}}
    res["profile"] = profile(models["sdpa"], seqs, rows, pad, dtype)
    print("profile:", json.dumps(res["profile"]), flush=True)

    outs, secs = {}, {k: [] for k in models}
    for m in models.values():
        forward_rows(m, seqs, rows[:200], layers, pad_id=pad)  # warm
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for impl in order:
            def one(impl=impl):
                outs[impl] = forward_rows(models[impl], seqs, rows, layers, pad_id=pad)
            secs[impl].append(round(timed(one), 2))
    tokens = outs["sdpa"].tokens
    res["attention"] = {
        impl: {"seconds": s, "median_seconds": statistics.median(s),
               "gemm_share_at_median": round(per_token * tokens / statistics.median(s) / 1e9 / gemm, 3),
               "max_abs_score_diff_vs_sdpa": float(np.abs(outs[impl].scores[:, 0] - outs["sdpa"].scores[:, 0]).max()),
               "max_abs_state_diff_vs_sdpa": float(np.abs(outs[impl].states.astype(np.float32)
                                                          - outs["sdpa"].states.astype(np.float32)).max())}
        for impl, s in secs.items()}
    print("attention:", json.dumps({k: (v["seconds"], v["gemm_share_at_median"]) for k, v in res["attention"].items()}),
          flush=True)

    if args.compile:
        base = models["sdpa"].model
        batches = [_batch(b, pad) for b in length_batches(pack_units(seqs, rows), 32, float(seqs.lengths().mean()))]

        def run(fn):
            with torch.inference_mode():
                for ids, pos, mask in batches:
                    fn(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, output_hidden_states=True)

        run(base)
        compiled = torch.compile(base, dynamic=True)
        first = timed(lambda: run(compiled))
        eager_s, compiled_s = [], []
        for _ in range(2):
            compiled_s.append(round(timed(lambda: run(compiled)), 2))
            eager_s.append(round(timed(lambda: run(base)), 2))
        res["compile"] = {"first_pass_seconds": round(first, 1), "compiled_seconds": compiled_s, "eager_seconds": eager_s,
                          "note": "decoder only (no scores, no hooks), all hidden states returned, same batches"}
        print("compile:", json.dumps(res["compile"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
