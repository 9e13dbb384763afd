"""The teacher forward against the GEMM ceiling: `extract.batch_size` swept, and where the time goes.

    .venv/bin/python bench/extract_sweep.py 8 16 32 64 128     # GEMM share per batch size, both modes
    .venv/bin/python bench/extract_sweep.py --profile per_choice 32   # torch.profiler table, one run

The sweep runs `engine.teacher.forward_rows` (all 30 layers plus teacher scores, no store) over 400
per-choice and 600 letter ARC-Easy train questions and prints the GEMM share as `bench/extract.py`
defines it (FLOPs per token x tokens run per second / `matmul_gflops` in the same process). The
profile prints torch.profiler's operator table for 200 questions. Output goes to the console; the
runs quoted in bench/README.md are in bench/results/extract_sweep.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import DataConfig, PromptConfig, TeacherConfig  # noqa: E402
from engine.hardware import forward_flops_per_token, matmul_gflops, pick_dtype  # noqa: E402
from engine.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.tasks import load_split  # noqa: E402
from engine.teacher import forward_rows  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "arc_easy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("batch_sizes", nargs="*", type=int, default=[32, 64, 128])
    p.add_argument("--profile", nargs=2, metavar=("MODE", "BATCH_SIZE"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(TeacherConfig())
    dtype, _ = pick_dtype("auto", gpu=False)
    model, tok = load_causal_lm(path, dtype), load_tokenizer(path)
    n = model.config.num_hidden_layers
    layers, pad = list(range(1, n + 1)), tok.pad_token_id
    examples = load_split(DataConfig(source=str(DATA)), "train")
    if args.profile:
        mode, bs = args.profile[0], int(args.profile[1])
        seqs = build_sequences(examples[:200], tok, PromptConfig(mode=mode))
        rows = np.arange(seqs.n_rows)
        forward_rows(model, seqs, rows[:64], layers, pad_id=pad, batch_size=bs)  # warm-up
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward_rows(model, seqs, rows, layers, pad_id=pad, batch_size=bs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    gemm = max(matmul_gflops(dtype, reps=10) for _ in range(3))
    print(f"dtype {dtype}; GEMM {gemm:.1f} GFLOP/s", flush=True)
    for mode, n_questions in (("per_choice", 400), ("letter", 600)):
        seqs = build_sequences(examples[:n_questions], tok, PromptConfig(mode=mode))
        per_token = forward_flops_per_token(model, 0.5 * float(seqs.lengths().mean()), layers=n)
        rows = np.arange(seqs.n_rows)
        forward_rows(model, seqs, rows[:64], layers, pad_id=pad, batch_size=32)  # warm-up
        for bs in args.batch_sizes:
            t = time.perf_counter()
            out = forward_rows(model, seqs, rows, layers, pad_id=pad, batch_size=bs)
            s = time.perf_counter() - t
            share = per_token * out.tokens / s / 1e9 / gemm
            print(f"{mode} batch_size {bs}: {s:.2f} s, {out.tokens / s:.0f} tok/s run, GEMM share {share:.3f}", flush=True)


if __name__ == "__main__":
    main()
