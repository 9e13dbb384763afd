"""Extraction throughput: a plain transformers loop against the engine, in both prompt modes.

    .venv/bin/python bench/extract.py              # prints a table, writes bench/results/extract.json

For each mode, over the same ARC-Easy train questions and the same token ids:
  (a) plain:   the loop a user would write: batches of 32 rows in data order, left-padded,
               `output_hidden_states=True`, full logits, log-softmax over the vocabulary, with the
               model as transformers loads it (its `sdpa` attention, plain linears);
  (b) engine:  `forward_rows` over balanced chunks written to a real store (all layers + teacher scores),
               the model as a CPU teacher replica runs it (`engine.attention`, `engine.packed`, and in
               16 bits `engine.decoder`'s blocks over unpadded tokens, since stop 32);
  (c) half:    the engine storing layers 1..n/2 without teacher scores: the forward stops at n/2.
"Real tokens" are the rows' own tokens (prefix + choice per row, no padding): the same numerator for
all three, so tokens/s compare the time to do the same work. The store's bytes on disk are divided
by the raw fp16 payload (rows x layers x hidden x 2).

GEMM share: how close the engine's forward comes to the machine's matmul ceiling in the chosen dtype,
    FLOPs per token (`engine.hardware.forward_flops_per_token`: 2 per block weight, plus attention over
    half the mean row length) x tokens run per second / the GEMM rate measured here
    (`engine.hardware.gemm_ceiling`: the faster of torch's plain and prepacked matmuls at the teacher's
    MLP shape, same dtype and threads; before stop 31 the plain one only). Target: at least 0.6.
    - `gemm_share_b`, `gemm_share_c`: runs (b) and (c), store writes included, against one ceiling read
      at the start (as committed before stop 31).
    - `forward_share`: `forward_rows` alone (all layers and the teacher's scores, as (b) without the
      store), `--share-reps` times, each run between two readings of the ceiling and held against their
      mean: on a shared 2-core VM the ceiling itself drifts (976-1038 GFLOP/s within one committed
      run, 739-987 in earlier ones), so a ceiling read
      once, at another moment, moves the share as much as any change to the forward. Its median is
      given twice: over the blocks' FLOPs only (as above), and over all the matmul FLOPs the forward
      runs, adding the vocabulary projection at the positions it scores
      (`engine.hardware.vocab_projection_flops` x `ForwardOut.projected`: about 40% of the per-choice
      tokens, 1 position per letter row).
The script runs under a CPU teacher replica's allocator settings (`cluster.runtime.as_cpu_worker`
re-executes it with them; `--plain-malloc` to not), since without them a forward's large temporaries
fault in fresh pages and the timings measure the host, not the forward (before stop 31 it ran without).
`--dtype auto` (the default) is what `teacher.dtype: auto` picks here: bf16 with native bf16, else fp32.
To time an AVX2-only machine's kernels on a newer CPU, set `engine.hardware.ISA_LIMITS` to AVX2 and pass
`--dtype float32` (what auto picks there); the results record them (`kernel_isa`):

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        .venv/bin/python bench/extract.py --dtype float32 --out bench/results/extract_avx2_kernels.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from cluster.runtime import as_cpu_worker, malloc_settings
from engine import store
from engine.config import DataConfig, PromptConfig, TeacherConfig
from engine.decoder import attach
from engine.hardware import (
    forward_flops_per_token,
    gemm_ceiling,
    kernel_isa,
    matmul_flags,
    pick_dtype,
    vocab_projection_flops,
)
from engine.models import load_causal_lm, load_tokenizer, resolve_model
from engine.packed import pack_linears
from engine.sequences import Sequences, build_sequences
from engine.tasks import load_split
from engine.teacher import forward_rows, length_batches, pack_units

OUT = Path(__file__).parent / "results" / "extract.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy"


@torch.inference_mode()
def plain_loop(model, seqs: Sequences, pad_id: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """States of every layer at each row's last token and the teacher's scores, the usual way."""
    n_layers = model.config.num_hidden_layers
    states = np.zeros((seqs.n_rows, n_layers, model.config.hidden_size), np.float16)
    scores = np.zeros(seqs.n_rows, np.float64)
    letters = torch.as_tensor(seqs.letter_ids)
    padded = 0
    for b0 in range(0, seqs.n_rows, batch_size):
        rows = range(b0, min(b0 + batch_size, seqs.n_rows))
        width = max(len(seqs.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(seqs.ids[r]):] = torch.as_tensor(seqs.ids[r])
            mask[i, width - len(seqs.ids[r]):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        padded += ids.numel()
        logp = torch.log_softmax(out.logits.float(), -1)
        states[b0:b0 + len(rows)] = torch.stack(out.hidden_states[1:], 1)[:, :, -1].float().numpy().astype(np.float16)
        for i, r in enumerate(rows):
            if seqs.mode == "letter":
                q = seqs.row_question[r]
                scores[r] = logp[i, -1, letters[seqs.answer[q]]]  # (all letters are there; one kept)
            else:
                n, s = len(seqs.ids[r]), int(seqs.start[r])
                tgt = torch.as_tensor(seqs.ids[r][s:])
                at = torch.arange(width - n + s - 1, width - 1)
                scores[r] = logp[i, at, tgt].sum()
    return states, scores, padded


def engine_run(model, seqs: Sequences, layers: list[int], pad_id: int, scores: bool, chunk_rows: int = 512) -> dict:
    """The engine's chunk loop (what each teacher replica runs) into a real store, then commit."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    path = tmp / "activations.zarr"
    t0 = time.perf_counter()
    identity = {"extract.chunk_rows": chunk_rows, "bench": True}
    part = store.create_or_resume(path, identity, {"layers": layers}, {"train": (seqs, [""] * seqs.n_questions, len(layers),
                                  model.config.hidden_size)}, scores=scores)
    size, tokens = store.chunk_size(seqs.n_rows, chunk_rows), 0
    for c in range(store.n_chunks(seqs.n_rows, size)):
        lo, hi = store.chunk_bounds(c, seqs.n_rows, size)
        chunk = seqs.rows_view(lo, hi)
        out = forward_rows(model, chunk, np.arange(chunk.n_rows), layers, pad_id=pad_id, batch_size=32, scores=scores)
        store.write_chunk(part, "train", c, out.states, out.scores)
        store.mark_done(part, "train", c)
        tokens += out.tokens
    store.commit(path)
    seconds = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    payload = seqs.n_rows * len(layers) * model.config.hidden_size * 2
    view = store.read_split(store.open_store(path), "train", seqs.mode)
    res = {"seconds": seconds, "tokens_run": tokens, "bytes_on_disk": on_disk, "bytes_payload": payload,
           "bytes_ratio": on_disk / payload, "states": np.asarray(view.group["activations"][:]),
           "scores": view.scores() if scores else None}
    shutil.rmtree(tmp)
    return res


def gemm_share(model, seqs: Sequences, run: dict, gemm: float, layers: int) -> dict:
    """The forward's share of the measured GEMM rate (see the module docstring)."""
    per_token = forward_flops_per_token(model, 0.5 * float(seqs.lengths().mean()), layers=layers)
    achieved = per_token * run["tokens_run"] / run["seconds"] / 1e9
    return {"flops_per_token": round(per_token), "gflops": round(achieved, 1), "share": round(achieved / gemm, 3)}


def padded_tokens(seqs: Sequences, batch_size: int) -> int:
    """Tokens in `forward_rows`' padded batches (units x the batch's longest): what a forward over
    padded batches runs, against `ForwardOut.tokens` real ones."""
    rows = np.arange(seqs.n_rows)
    mean_len = float(np.mean([len(seqs.ids[r]) for r in rows]))
    return sum(len(b) * max(len(u.tokens) for u in b) for b in length_batches(pack_units(seqs, rows), batch_size, mean_len))


def forward_share(model, seqs: Sequences, pad_id: int, dtype: str, reps: int, batch_size: int = 32) -> dict:
    """`forward_rows` (all layers, teacher scores) `reps` times, each between two readings of the GEMM
    ceiling; the share of each run against their mean, over block FLOPs and over all matmul FLOPs."""
    n = model.config.num_hidden_layers
    per_token = forward_flops_per_token(model, 0.5 * float(seqs.lengths().mean()))
    runs = []
    for _ in range(reps):
        before = gemm_ceiling(dtype)["ceiling"]
        t0 = time.perf_counter()
        out = forward_rows(model, seqs, np.arange(seqs.n_rows), list(range(1, n + 1)), pad_id=pad_id,
                           batch_size=batch_size)
        seconds = time.perf_counter() - t0
        ceiling = 0.5 * (before + gemm_ceiling(dtype)["ceiling"])
        blocks = per_token * out.tokens
        every = blocks + vocab_projection_flops(model) * out.projected
        runs.append({"seconds": round(seconds, 3), "ceiling_gflops": round(ceiling, 1),
                     "share_blocks": round(blocks / seconds / 1e9 / ceiling, 3),
                     "share_all_matmuls": round(every / seconds / 1e9 / ceiling, 3)})
    return {"reps": reps, "batch_size": batch_size, "tokens_run": out.tokens, "padded_tokens": padded_tokens(seqs, batch_size),
            "projected_positions": out.projected,
            "block_flops_per_token": round(per_token), "vocab_projection_flops": round(vocab_projection_flops(model)),
            "median_share_blocks": float(np.median([r["share_blocks"] for r in runs])),
            "median_share_all_matmuls": float(np.median([r["share_all_matmuls"] for r in runs])), "runs": runs}


def bench_mode(model, plain, tok, mode: str, n_questions: int, gemm: float, dtype: str, share_reps: int) -> dict:
    examples = load_split(DataConfig(source=str(DATA)), "train")[:n_questions]
    t0 = time.perf_counter()
    seqs = build_sequences(examples, tok, PromptConfig(mode=mode))
    tokenize_s = time.perf_counter() - t0
    real = int(seqs.lengths().sum())
    n = model.config.num_hidden_layers
    pad = tok.pad_token_id
    warm = seqs.rows_view(0, min(8, seqs.n_rows))
    plain_loop(plain, warm, pad), forward_rows(model, warm, np.arange(warm.n_rows), [1, n], pad_id=pad)

    t0 = time.perf_counter()
    a_states, a_scores, a_padded = plain_loop(plain, seqs, pad)
    a_s = time.perf_counter() - t0
    b = engine_run(model, seqs, list(range(1, n + 1)), pad, scores=True)
    c = engine_run(model, seqs, list(range(1, n // 2 + 1)), pad, scores=False)

    if mode == "letter":
        b_scores = b["scores"][np.arange(seqs.n_rows), seqs.answer[seqs.row_question]]
    else:
        b_scores = b["scores"][:, 0]
    res = {
        "mode": mode, "questions": n_questions, "rows": seqs.n_rows, "real_tokens": real, "tokenize_s": round(tokenize_s, 3),
        "a_plain": {"seconds": round(a_s, 1), "tokens_run": a_padded, "real_tokens_per_s": round(real / a_s, 1)},
        "b_engine_all_layers": {"seconds": round(b["seconds"], 1), "tokens_run": b["tokens_run"],
                                "real_tokens_per_s": round(real / b["seconds"], 1), "bytes_ratio": round(b["bytes_ratio"], 4)},
        "c_engine_half_depth": {"seconds": round(c["seconds"], 1), "tokens_run": c["tokens_run"], "layers": f"1..{n // 2}",
                                "real_tokens_per_s": round(real / c["seconds"], 1), "bytes_ratio": round(c["bytes_ratio"], 4)},
        "gemm_share_b": gemm_share(model, seqs, b, gemm, n),
        "gemm_share_c": gemm_share(model, seqs, c, gemm, n // 2),
        "forward_share": forward_share(model, seqs, pad, dtype, share_reps),
        "b_over_a": round(a_s / b["seconds"], 2),
        "c_over_a": round(a_s / c["seconds"], 2),
        "check": {
            "max_abs_state_diff_b_vs_a": float(np.abs(b["states"].astype(np.float32) - a_states).max()),
            "max_abs_score_diff_b_vs_a": float(np.abs(b_scores - a_scores).max()),
            "c_equals_b_on_its_layers": bool(np.array_equal(c["states"], b["states"][:, : n // 2])),
        },
    }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--letter-questions", type=int, default=300)
    p.add_argument("--per-choice-questions", type=int, default=200)
    p.add_argument("--dtype", default="auto", help="'auto' (as teacher.dtype: bf16 with native bf16, else fp32), "
                                                    "'float32' or 'bfloat16'")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--share-reps", type=int, default=5, help="runs of the forward-share measurement per mode")
    p.add_argument("--plain-malloc", action="store_true", help="keep this process's allocator settings")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if not args.plain_malloc:
        as_cpu_worker()
    torch.set_num_threads(args.threads)
    teacher = TeacherConfig()
    path = resolve_model(teacher)
    args.dtype, why = pick_dtype(args.dtype, gpu=False)
    model, tok = load_causal_lm(path, args.dtype), load_tokenizer(path)
    packed = pack_linears(model)
    decoder = attach(model)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), use_safetensors=True).eval()
    limit = gemm_ceiling(args.dtype)
    gemm = limit["ceiling"]
    print(f"dtype {args.dtype} ({why}); {packed} linears packed; blocks: {decoder}; GEMM ceiling {gemm:.1f} GFLOP/s "
          f"(matmul {limit['matmul']:.1f}, packed {limit['packed']:.1f})", flush=True)
    results = {
        "command": "python bench/extract.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "out"),
        "malloc": malloc_settings(),
        "attention": model.config._attn_implementation,
        "teacher": teacher.model, "dtype": args.dtype, "dtype_why": why, "gemm_gflops": round(gemm, 1),
        "gemm_ceiling_parts": {k: round(v, 1) for k, v in limit.items()}, "packed_linears": packed, "decoder": decoder,
        "cpu_flags": matmul_flags(), "kernel_isa": kernel_isa(), "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "versions": {k: md.version(k) for k in ("torch", "transformers", "zarr")},
        "modes": [bench_mode(model, plain, tok, m, q, gemm, args.dtype, args.share_reps)
                  for m, q in (("letter", args.letter_questions), ("per_choice", args.per_choice_questions))],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'mode':<11}{'rows':>6}{'real tok':>10}{'(a) tok/s':>11}{'(b) tok/s':>11}{'(c) tok/s':>11}"
          f"{'b/a':>7}{'c/a':>7}{'bytes b':>9}{'bytes c':>9}")
    for m in results["modes"]:
        print(f"{m['mode']:<11}{m['rows']:>6}{m['real_tokens']:>10}{m['a_plain']['real_tokens_per_s']:>11}"
              f"{m['b_engine_all_layers']['real_tokens_per_s']:>11}{m['c_engine_half_depth']['real_tokens_per_s']:>11}"
              f"{m['b_over_a']:>7}{m['c_over_a']:>7}{m['b_engine_all_layers']['bytes_ratio']:>9}"
              f"{m['c_engine_half_depth']['bytes_ratio']:>9}")
        print(f"{'':<11}checks: {m['check']}; tokenize {m['tokenize_s']}s")
        print(f"{'':<11}GEMM share (target >= 0.6): all layers {m['gemm_share_b']['share']}, "
              f"half depth {m['gemm_share_c']['share']} of {results['gemm_gflops']} GFLOP/s")
        f = m["forward_share"]
        print(f"{'':<11}forward alone, each run against the ceiling read around it (median of {f['reps']}): "
              f"blocks {f['median_share_blocks']}, all matmuls {f['median_share_all_matmuls']} "
              f"(runs {[r['share_blocks'] for r in f['runs']]})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
