"""The teacher's CPU forward paths against transformers' defaults: attention, packed linears, numerics.

    .venv/bin/python bench/cpu_forward.py      # about 8 min on 2 cores; writes bench/results/cpu_forward.json

1. kernels: one attention call per shape (rows x 9 query heads / 3 key-value heads x tokens, head 64, a
   causal boolean mask), in bf16 and float32: transformers' `sdpa` route (key/value heads repeated,
   then SDPA), SDPA reading grouped heads (`enable_gqa`), and `engine.attention.grouped`. Best of 3
   timings of 20 calls, in milliseconds per call.
2. gemms: torch's plain matmul (`a @ w.T`) against oneDNN's with the weight prepacked
   (`engine.hardware.matmul_gflops(packed=True)`), at the teacher's MLP shape for 950 and 3072 rows;
   best of 3 readings.
3. forwards: `engine.teacher.forward_rows` (all layers, teacher scores, batch 32) over the first 200
   ARC-Easy train questions in each prompt mode, the packaged teacher in bf16 four ways: as
   transformers loads it (`sdpa`), as `engine.models.load_causal_lm` loads it (`engine`: its
   attention), that with `engine.packed.pack_linears` (`packed`: what a CPU teacher replica ran at
   stop 31), and that with `engine.decoder.attach` (`unpadded`: what a CPU teacher replica runs since
   stop 32); `--reps` rounds, each variant first, second, third and fourth in turn; ratios per round.
4. numerics: each bf16 forward's teacher scores and stored (fp16) states against a float32 forward of
   the same rows, whether packing changed any bit, and whether the float32 forwards of `engine` and
   `sdpa` are equal (`engine.decoder` leaves float32 models to transformers, so they are still).
The script runs under a CPU teacher replica's allocator settings (`cluster.runtime.as_cpu_worker`).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.runtime import as_cpu_worker, malloc_settings  # noqa: E402
from engine.attention import ATTENTION, grouped, mask_bias, register  # noqa: E402
from engine.config import DataConfig, PromptConfig, TeacherConfig  # noqa: E402
from engine.decoder import attach  # noqa: E402
from engine.hardware import kernel_isa, matmul_flags, matmul_gflops  # noqa: E402
from engine.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from engine.packed import pack_linears  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.tasks import load_split  # noqa: E402
from engine.teacher import forward_rows  # noqa: E402

OUT = REPO / "bench" / "results" / "cpu_forward.json"
DATA = REPO.parent / "shared" / "data" / "arc_easy"
SHAPES = [(30, 32), (20, 45), (12, 80), (8, 110), (4, 256), (1, 1024)]


def _ms(f, n: int = 20) -> float:
    f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, time.perf_counter() - t)
    return round(best / n * 1e3, 3)


def _kernel_row(dtype: torch.dtype, B: int, T: int) -> dict:
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, 64, generator=g).to(dtype) for h in (9, 3, 3))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T).contiguous()
    return {
        "dtype": str(dtype).removeprefix("torch."), "rows": B, "tokens": T,
        "transformers_sdpa_ms": _ms(lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.125)),
        "sdpa_gqa_ms": _ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)),
        "grouped_ms": _ms(lambda: grouped(q, k, v, mask_bias(mask), 0.125)),
    }


def kernels() -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for B, T in SHAPES:
            rows.append(_kernel_row(dtype, B, T))
            print(rows[-1], flush=True)
    return rows


def _sdpa_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa",
                                                use_safetensors=True).eval()


def _run(model, seqs, pad: int):
    n = model.config.num_hidden_layers
    t = time.perf_counter()
    out = forward_rows(model, seqs, np.arange(seqs.n_rows), list(range(1, n + 1)), pad_id=pad, batch_size=32)
    return out, time.perf_counter() - t


def _gap(a, b) -> dict:
    s = np.abs(a.scores[np.isfinite(b.scores)] - b.scores[np.isfinite(b.scores)])
    st = np.abs(a.states.astype(np.float32) - b.states.astype(np.float32))
    return {"scores_mean_abs": float(s.mean()), "scores_max_abs": float(s.max()),
            "states_mean_abs": float(st.mean()), "states_max_abs": float(st.max())}


def _ratio(num: list[float], den: list[float]) -> dict:
    r = np.asarray(num) / np.asarray(den)
    return {"median": round(float(np.median(r)), 3), "range": [round(float(r.min()), 3), round(float(r.max()), 3)]}


def forwards(questions: int, reps: int) -> list[dict]:
    path = resolve_model(TeacherConfig())
    tok = load_tokenizer(path)
    examples = load_split(DataConfig(source=str(DATA)), "train")[:questions]
    models = {"sdpa": _sdpa_model(path, "bfloat16"), "engine": load_causal_lm(path, "bfloat16"),
              "packed": load_causal_lm(path, "bfloat16"), "unpadded": load_causal_lm(path, "bfloat16")}
    assert models["engine"].config._attn_implementation == ATTENTION
    assert pack_linears(models["packed"]) > 0 and pack_linears(models["unpadded"]) > 0
    assert attach(models["unpadded"]) == "unpadded"
    ours32, theirs32 = load_causal_lm(path, "float32"), _sdpa_model(path, "float32")
    res = []
    for mode in ("per_choice", "letter"):
        seqs = build_sequences(examples, tok, PromptConfig(mode=mode))
        pad = tok.pad_token_id
        ref, _ = _run(ours32, seqs, pad)
        ref_sdpa, _ = _run(theirs32, seqs, pad)
        for m in models.values():
            _run(m, seqs.rows_view(0, 16), pad)
        seconds, first = {k: [] for k in models}, {}
        names = list(models)
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:  # each variant first, second, ... in turn
                out, sec = _run(models[name], seqs, pad)
                seconds[name].append(round(sec, 3))
                first.setdefault(name, out)
        res.append({
            "mode": mode, "questions": questions, "rows": seqs.n_rows, "reps": reps, "seconds": seconds,
            "engine_over_sdpa": _ratio(seconds["engine"], seconds["sdpa"]),
            "packed_over_engine": _ratio(seconds["packed"], seconds["engine"]),
            "packed_over_sdpa": _ratio(seconds["packed"], seconds["sdpa"]),
            "unpadded_over_packed": _ratio(seconds["unpadded"], seconds["packed"]),
            "unpadded_over_sdpa": _ratio(seconds["unpadded"], seconds["sdpa"]),
            "bf16_vs_fp32": {k: _gap(first[k], ref) for k in models},
            "packed_equals_engine": bool(np.array_equal(first["packed"].states, first["engine"].states)
                                         and np.array_equal(first["packed"].scores, first["engine"].scores)),
            "fp32_engine_equals_fp32_sdpa": bool(np.array_equal(ref.scores, ref_sdpa.scores)
                                                 and np.array_equal(ref.states, ref_sdpa.states)),
        })
        print({k: v for k, v in res[-1].items() if k != "seconds"}, flush=True)
    return res


def gemms() -> list[dict]:
    """torch's plain matmul against the prepacked oneDNN one, at the teacher's MLP shape."""
    rows = []
    for dtype in ("bfloat16", "float32"):
        for m in (950, 3072):
            plain = max(matmul_gflops(dtype, m=m) for _ in range(3))
            packed = max(matmul_gflops(dtype, m=m, packed=True) for _ in range(3))
            rows.append({"dtype": dtype, "m": m, "k": 576, "n": 1536, "matmul_gflops": round(plain, 1),
                         "packed_gflops": round(packed, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    as_cpu_worker()
    torch.set_num_threads(args.threads)
    register()
    t0 = time.perf_counter()
    results = {
        "command": "python bench/cpu_forward.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": matmul_flags(),
                    "kernel_isa": kernel_isa(), "malloc": malloc_settings()},
        "versions": {k: md.version(k) for k in ("torch", "transformers")},
        "kernels": kernels(),
        "gemms": gemms(),
        "forwards": forwards(args.questions, args.reps),
    }
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
