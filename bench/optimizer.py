"""AdamW's implementations on the default student: the per-parameter loop, foreach, and fused.

    .venv/bin/python bench/optimizer.py          # prints, writes bench/results/student_optimizer.json

With an AVX2-only machine's kernels on a newer CPU (fp32, what `auto` picks there; see bench/extract.py):

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python \
        bench/optimizer.py --dtype float32 --out bench/results/student_optimizer_avx2_kernels.json

On CPU torch runs AdamW as a Python loop over the parameters (a dozen elementwise ops each) unless
told otherwise; `engine.student.make_optimizer` asks for the fused kernel. For each implementation,
on the default student (all-MiniLM-L6-v2, fully fine-tuned, 22.7M trainable parameters) in the dtype
`student.dtype: auto` picks here:
  step:   the optimizer step alone, on fixed random gradients (ms, median of `--steps`);
  epoch:  one training epoch of `--questions` ARC-Easy train questions (gold labels, the default's
          batches, schedule and gradient clipping), from the same initial weights;
and, against the loop, the largest difference in any weight after the steps on the same gradients
(the same update: rounding only) and after the epoch (where, under bf16 autocast, rounding differences
change later gradients and grow). The three epochs alternate over `--repeats` rounds and the medians are kept.
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

from engine import labels
from engine import student as st
from engine.config import load
from engine.hardware import kernel_isa, matmul_flags, pick_dtype
from engine.models import resolve_model
from engine.tasks import load_role

OUT = Path(__file__).parent / "results" / "student_optimizer.json"
IMPLS = {"loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
         "fused": {"foreach": False, "fused": True}}


def optimizer(model, s, impl: str) -> torch.optim.Optimizer:
    """The engine's AdamW (same groups, decay and lr), run by implementation `impl`."""
    opt = st.make_optimizer(model, s.train_lr, s.weight_decay)
    for g in opt.param_groups:
        g.update(IMPLS[impl])
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="student.dtype: 'auto', 'float32' or 'bfloat16'")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = load(args.config, [f"student.dtype={args.dtype}", "student.finetune=full", "student.lr=3e-5"])  # as its committed reading
    s = cfg.student
    torch.set_num_threads(s.cpus_per_worker)
    dtype, why = pick_dtype(s.dtype, gpu=False)
    path = st.resolve_student_path(s, resolve_model(cfg.teacher))
    tok, spec = st.student_inputs(s, path, cfg.prompt.answer_format)
    train = st.encode_examples(load_role(cfg.data, "train")[: args.questions], tok, spec)
    targets = labels.gold_targets(train.answer, train.n_choices)
    batches = st.make_batches(train, targets, np.arange(train.n_questions), s.train_batch_size, tok.pad_token_id,
                              rng=np.random.default_rng(0), gold=train.answer)
    torch.manual_seed(0)
    model = st.build_student(path, s, max_choices=train.max_choices, answer_format=spec.answer_format, tokenizer=tok)
    st.set_trainable(model, s.finetune, s.top_blocks)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    step_ms, stepped = {}, {}
    for impl in IMPLS:
        opt = optimizer(model, s, impl)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3 if p.requires_grad else None
        times = []
        for i in range(args.steps + 3):
            t = time.perf_counter()
            opt.step()
            if i >= 3:  # the first steps allocate the state
                times.append(time.perf_counter() - t)
        step_ms[impl] = round(1e3 * float(np.median(times)), 2)
        stepped[impl] = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)
    model.zero_grad(set_to_none=True)

    epochs: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    after: dict[str, dict] = {}
    for _ in range(args.repeats):
        for impl in IMPLS:
            model.load_state_dict(start)
            opt = optimizer(model, s, impl)
            sched = st.make_scheduler(opt, len(batches), start_step=0)
            torch.manual_seed(0)  # the same dropout masks for every implementation
            t = time.perf_counter()
            loss = st.train_epoch(model, batches, opt, sched, dtype=dtype, soft=s.soft, temperature=s.temperature,
                                  alpha=1.0)
            epochs[impl].append(time.perf_counter() - t)
            after[impl] = {"loss": loss, "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    same_grads = {impl: float(max((stepped[impl][k].float() - stepped["loop"][k].float()).abs().max() for k in start))
                  for impl in IMPLS}
    diff = {impl: float(max((after[impl]["weights"][k].float() - after["loop"]["weights"][k].float()).abs().max()
                            for k in start)) for impl in IMPLS}
    epoch_s = {impl: round(float(np.median(v)), 2) for impl, v in epochs.items()}
    results = {
        "command": " ".join(["python", "bench/optimizer.py", *sys.argv[1:]]), "config": args.config,
        "student": s.model, "trainable_parameters": n_params, "dtype": dtype, "dtype_why": why,
        "questions": train.n_questions, "steps_per_epoch": len(batches), "threads": s.cpus_per_worker,
        "step_ms": step_ms, "epoch_seconds": epoch_s, "epoch_seconds_all": {k: [round(x, 2) for x in v] for k, v in epochs.items()},
        "epoch_speedup_over_loop": {impl: round(epoch_s["loop"] / epoch_s[impl], 3) for impl in IMPLS},
        "epoch_loss": {impl: after[impl]["loss"] for impl in IMPLS},
        "max_abs_weight_diff_vs_loop_same_gradients": same_grads,
        "max_abs_weight_diff_vs_loop_after_epoch": diff,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_flags": matmul_flags(), "kernel_isa": kernel_isa()},
        "versions": {k: md.version(k) for k in ("torch", "transformers")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for impl in IMPLS:
        print(f"{impl:<8} step {step_ms[impl]:>7} ms   epoch {epoch_s[impl]:>6} s   loss {after[impl]['loss']:.6f}   "
              f"max |w - w_loop| {same_grads[impl]:.1e} same gradients, {diff[impl]:.1e} after the epoch")
    print(f"{train.n_questions} questions, {len(batches)} steps, {dtype} ({why}); wrote {args.out}")


if __name__ == "__main__":
    main()
