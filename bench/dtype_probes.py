"""Do probes on a bf16 store reach the accuracy of probes on an fp32 store?

    .venv/bin/python bench/dtype_probes.py          # prints, writes bench/results/dtype_probes.json

The default's ARC-Easy sample (600 / 300 / 1000) is extracted twice with the packaged teacher, once with
`teacher.dtype=float32` and once with `bfloat16` (stores under runs/dtype-<dtype>, reused if there), and
the default's probe sweep runs on each for `--seeds` seeds (the seed moves the cross-fitting folds).
Reported per dtype: the best probe's test accuracy per seed, each layer's best probe's test accuracy
(seed 0), and the extraction's wall time; and bf16 - fp32 on the same test questions and
seeds, with a 95% interval over seeds and questions. "The same within noise" means that interval holds 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import time
from pathlib import Path

import numpy as np

from cluster import pipeline, runtime
from engine import metrics
from engine.config import load
from engine.hardware import matmul_flags

OUT = Path(__file__).parent / "results" / "dtype_probes.json"


def sweep(dtype: str, seeds: list[int], config: str) -> dict:
    cfg = load(config, [f"teacher.dtype={dtype}", f"out_dir=runs/dtype-{dtype}", "student.label_sources=[]",
                        "baseline.enabled=false"])
    run = pipeline.Run(cfg)
    run.check_inputs()
    t0 = time.perf_counter()
    pipeline.extract(run)
    extract_s = run.timings.get("extract") or round(time.perf_counter() - t0, 1)
    _, test = pipeline.teacher_logp(run, "test")
    out = {"extract_seconds": extract_s, "seeds": {}, "correct": {}}
    for seed in seeds:
        crun = run.variant(dataclasses.replace(cfg, seed=seed))
        probes = pipeline.probe(crun)
        best = probes.best
        probs = probes.test_probs
        out["correct"][seed] = probs.argmax(1) == test.answer
        out["seeds"][seed] = {"best": {k: best.get(k) for k in ("family", "combine", "layer", "layers", "C")},
                              "test_acc": float(best["test_acc"])}
        if seed == seeds[0]:
            out["per_layer_test_acc"] = {str(r["layer"]): r["test_acc"] for r in probes.per_layer}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    runtime.init(load(args.config).ray)
    try:
        res = {d: sweep(d, seeds, args.config) for d in ("float32", "bfloat16")}
    finally:
        runtime.shutdown()
    fp, bf = res["float32"], res["bfloat16"]
    diff = metrics.seeds_and_questions_bootstrap(
        np.stack([bf["correct"][s].astype(float) - fp["correct"][s].astype(float) for s in seeds]))
    layers = sorted(set(fp.get("per_layer_test_acc", {})) & set(bf.get("per_layer_test_acc", {})), key=int)
    layer_gap = [bf["per_layer_test_acc"][k] - fp["per_layer_test_acc"][k] for k in layers]
    results = {
        "command": f"python bench/dtype_probes.py --seeds {args.seeds}", "config": args.config,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "per_dtype": {d: {k: v for k, v in r.items() if k != "correct"} for d, r in res.items()},
        "best_probe_test_acc_mean": {d: float(np.mean([r["seeds"][s]["test_acc"] for s in seeds])) for d, r in res.items()},
        "bf16_minus_fp32": {k: diff[k] for k in ("mean", "lo", "hi", "n_seeds", "n_questions", "per_seed")},
        "same_within_noise": not metrics.excludes_zero(diff["lo"], diff["hi"]),
        "per_layer_gap": {"max_abs": float(np.max(np.abs(layer_gap))) if layer_gap else None,
                          "mean": float(np.mean(layer_gap)) if layer_gap else None},
        "machine": {"cpu_flags": matmul_flags()},
        "versions": {k: md.version(k) for k in ("torch", "transformers", "scikit-learn", "zarr")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["best_probe_test_acc_mean"]
    print(f"best probe test accuracy over {args.seeds} seeds: fp32 {m['float32']:.4f}, bf16 {m['bfloat16']:.4f}; "
          f"bf16 - fp32 {100 * diff['mean']:+.2f} pts [{100 * diff['lo']:+.2f}, {100 * diff['hi']:+.2f}] "
          f"({'the same within noise' if results['same_within_noise'] else 'different'}); extraction "
          f"{fp['extract_seconds']} s fp32, {bf['extract_seconds']} s bf16; wrote {args.out}")


if __name__ == "__main__":
    main()
