"""Which compute dtype this machine runs fastest, decided by facts it can check.

`dtype: auto` (teacher, baseline, student) becomes bfloat16 on a GPU and on a CPU with native bf16
matmuls (the `avx512_bf16` or `amx_bf16` flag), and float32 elsewhere: on an AVX2-only CPU bf16
matmuls are emulated and about 6x slower than fp32. The choice and the fact behind it are recorded
with every artifact (`resolve` returns them), so a store says how it was made.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (as /proc/cpuinfo spells them) that mean native bf16 matmuls."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def pick_dtype(requested: str, *, gpu: bool, flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """(dtype, why): `requested` itself unless it is 'auto'; then bf16 on a GPU or a native-bf16 CPU."""
    if requested != "auto":
        return requested, "set in the config"
    if gpu:
        return "bfloat16", "auto: runs on a GPU"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"auto: the CPU has native bf16 ({native[0]})"
    return "float32", "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"


def resolve(cfg: Any) -> tuple[Any, dict[str, dict[str, str]]]:
    """`cfg` with every 'auto' dtype replaced by this machine's choice, and {section: {dtype, why}}.

    The teacher runs where extraction runs (GPUs when `extract.gpus_per_replica` > 0), the baseline
    where the pipeline places the vLLM actor (on GPUs under the same condition, whatever the driver's
    own node has), the student where Ray Train puts it (`student.use_gpu`). Idempotent: a resolved
    config comes back unchanged."""
    choices: dict[str, dict[str, str]] = {}
    changes: dict[str, Any] = {}
    for section, gpu in (("teacher", cfg.extract.gpus_per_replica > 0),
                         ("baseline", cfg.extract.gpus_per_replica > 0),
                         ("student", cfg.student.use_gpu)):
        sub = getattr(cfg, section)
        dtype, why = pick_dtype(sub.dtype, gpu=gpu)
        choices[section] = {"dtype": dtype, "why": why}
        if dtype != sub.dtype:
            changes[section] = dataclasses.replace(sub, dtype=dtype)
    return (dataclasses.replace(cfg, **changes) if changes else cfg), choices


MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The CPU flags that decide matmul speed, written down with every timed figure."""


def matmul_flags() -> list[str]:
    """Which of `MATMUL_FLAGS` this CPU has, sorted."""
    return sorted(f for f in MATMUL_FLAGS if f in cpu_flags())


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
"""Environment variables that make torch's own kernels, MKL (fp32 matmuls) and oneDNN (bf16 matmuls)
use less than the CPU has, e.g. all three set to AVX2 to time an AVX2-only machine's kernels on a
newer CPU (its clock and caches stay this one's)."""


def kernel_isa() -> dict[str, str]:
    """The instruction set torch's kernels use here (`torch`), and any `ISA_LIMITS` set: written down
    beside `matmul_flags` with a timed figure, since the flags alone do not say what ran."""
    import os

    import torch

    return {"torch": torch.backends.cpu.get_cpu_capability(), **{k: os.environ[k] for k in ISA_LIMITS if k in os.environ}}


def free_page_reporting(sys_root: str = "/sys") -> dict:
    """Whether this machine is a VM guest that hands freed memory back to its host (Linux free page
    reporting, through virtio-balloon): there, memory that has stayed free for a couple of seconds is
    returned, and the first write to it afterwards waits on the host (measured on a 2-core Xeon guest:
    3-7 s of kernel time per GiB, against 0.2 s for memory freed a second earlier;
    `bench/memory_state.py`). Written down with a timed figure, since it decides how much a new
    process's memory costs. `reporting`: whether a balloon device reports free pages; `order`: the smallest
    block it reports (2**order pages of 4 KiB), None where nothing is reported."""
    order = Path(sys_root, "module/page_reporting/parameters/page_reporting_order")
    # A virtio device's `features` is a string of bits; VIRTIO_BALLOON_F_REPORTING is bit 5.
    balloons = sorted(Path(sys_root, "bus/virtio/drivers/virtio_balloon").glob("virtio*/features"))
    on = any(len(bits := f.read_text().strip()) > 5 and bits[5] == "1" for f in balloons)
    return {"reporting": on, "order": int(order.read_text()) if on and order.exists() else None}


def matmul_gflops(dtype: str = "float32", *, m: int = 3072, k: int = 576, n: int = 1536, reps: int = 3,
                  trials: int = 5, packed: bool = False) -> float:
    """Measured GEMM rate (GFLOP/s) of one (m, k) x (k, n) matmul in `dtype` with torch's current threads:
    the ceiling a forward in that dtype is held against (default shape: the packaged teacher's MLP).
    `packed`: through oneDNN with the weight prepacked (`engine.packed`), instead of `a @ w.T`.
    The best of `trials` timings of `reps` matmuls each: a ceiling is a maximum, and one short timing on a
    shared 2-core machine reads it 10-20% low."""
    import time

    import torch

    a, w = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(n, k, dtype=getattr(torch, dtype))
    if packed:
        p = torch.ops.mkldnn._reorder_linear_weight(w, m)

        def run():
            return torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], "")
    else:
        def run():
            return a @ w.T
    run()  # warm-up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            run()
        best = min(best, time.perf_counter() - t)
    return reps * 2 * m * k * n / best / 1e9


def gemm_ceiling(dtype: str) -> dict[str, float]:
    """The GEMM limit a forward in `dtype` is held against: the faster of torch's plain matmul and the
    prepacked oneDNN one (`matmul_gflops`), whichever the forward itself uses, so that no kernel of
    torch's runs above it. {'matmul', 'packed' (0 where oneDNN cannot run it), 'ceiling'}."""
    plain = matmul_gflops(dtype)
    try:
        packed = matmul_gflops(dtype, packed=True)
    except (RuntimeError, NotImplementedError):
        packed = 0.0
    return {"matmul": plain, "packed": packed, "ceiling": max(plain, packed)}


def forward_flops_per_token(model, mean_context: float, *, layers: int | None = None) -> float:
    """FLOPs one token costs in a causal LM's forward through `layers` blocks (all by default): 2 per
    weight of the blocks' matrices, plus attention's QK^T and AV over `mean_context` earlier positions
    (2 * 2 * context * hidden per block). Embedding lookups and the vocabulary projection are left out:
    the teacher forward projects only the positions it scores (`vocab_projection_flops` each)."""
    blocks = list(model.get_decoder().layers)[: layers or None]
    weights = sum(_matrix_weights(m) for b in blocks for m in b.modules())
    attn = 4.0 * mean_context * model.config.hidden_size * len(blocks)
    return 2.0 * weights + attn


def vocab_projection_flops(model) -> float:
    """FLOPs of projecting one position's final state onto the vocabulary: 2 per weight of the output
    embedding (the per-position cost of the teacher's scores, `engine.teacher.ForwardOut.projected`)."""
    return 2.0 * _matrix_weights(model.get_output_embeddings())


def _matrix_weights(module) -> int:
    """Weights of a module's own matrix: a linear's in x out (also when packed, `engine.packed`), else
    its 2-D parameters (not its children's)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    return sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 2)
