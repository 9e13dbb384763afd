"""Why the default is sized as it is: matmul speed by dtype, teacher forward speed, packed token counts.

    .venv/bin/python bench/cpu_budget.py            # prints and writes bench/results/cpu_budget.json
    .venv/bin/python bench/cpu_budget.py --out F    # elsewhere (e.g. with engine.hardware.ISA_LIMITS set)

Figures: fp32 vs bf16 matmul GFLOP/s (the teacher's MLP shape), the packaged teacher's forward in
tokens/s with all hidden states (fp32 and bf16, per-choice packed rows), and ARC-Easy token counts
per split for per-choice rows unpacked vs packed (shared question prefix encoded once) and letter mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import DataConfig, PromptConfig, TeacherConfig
from engine.hardware import kernel_isa, matmul_flags, matmul_gflops
from engine.models import load_causal_lm, load_tokenizer, resolve_model
from engine.sequences import build_sequences
from engine.tasks import load_split
from engine.teacher import forward_rows, pack_units

OUT = Path(__file__).parent / "results" / "cpu_budget.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy"


def forward_tokens_per_s(path: str, dtype: str, seqs, rows: np.ndarray, pad_id: int) -> float:
    model = load_causal_lm(path, dtype)
    forward_rows(model, seqs, rows[:8], list(range(1, 31)), pad_id=pad_id)  # warm-up
    t = time.perf_counter()
    out = forward_rows(model, seqs, rows, list(range(1, 31)), pad_id=pad_id, batch_size=32)
    return out.tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {"command": " ".join(["python", "bench/cpu_budget.py", *sys.argv[1:]]),
                 "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__}}
    res["machine"]["isa"] = matmul_flags()
    res["machine"]["kernel_isa"] = kernel_isa()
    res["matmul_gflops"] = {d: round(matmul_gflops(d), 1) for d in ("float32", "bfloat16")}
    print("matmul GFLOP/s:", res["matmul_gflops"], flush=True)

    path = resolve_model(TeacherConfig())
    tok = load_tokenizer(path)
    counts = {}
    for split in ("train", "validation", "test"):
        ex = load_split(DataConfig(source=str(DATA)), split)
        pc = build_sequences(ex, tok, PromptConfig(mode="per_choice"))
        packed = sum(len(u.tokens) for u in pack_units(pc, np.arange(pc.n_rows)))
        letter = build_sequences(ex, tok, PromptConfig(mode="letter"))
        counts[split] = {"questions": len(ex), "per_choice_unpacked": int(pc.lengths().sum()),
                         "per_choice_packed": int(packed), "letter": int(letter.lengths().sum())}
    res["arc_easy_tokens"] = counts
    print("ARC-Easy tokens:", json.dumps(counts), flush=True)

    ex = load_split(DataConfig(source=str(DATA)), "test")[:40]
    seqs = build_sequences(ex, tok, PromptConfig(mode="per_choice"))
    rows = np.arange(seqs.n_rows)
    res["teacher_forward_tokens_per_s"] = {
        d: round(forward_tokens_per_s(path, d, seqs, rows, tok.pad_token_id), 1) for d in ("float32", "bfloat16")
    }
    print("teacher forward tokens/s (30 hidden states, packed per-choice, 40 questions):",
          res["teacher_forward_tokens_per_s"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
