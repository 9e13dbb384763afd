"""Probe sweep wall time: Ray tasks against plain sequential scikit-learn, on the same store and work.

    .venv/bin/distill extract configs/default.yaml      # once: the store this reads
    .venv/bin/python bench/probes.py                    # prints, writes bench/results/probes.json

Both sides do the same work: for every (family, layer, C), fit on train and score validation and test
(reading that layer from the store), pick the best on validation, then cross-fit it over the folds.
Sequential runs it in this process, one fit after another: once with scikit-learn's default threading
(what a plain script gets) and once capped at one BLAS/OpenMP thread (to separate the gain of running
fits side by side from the cost of BLAS threads on small problems).
Ray runs `cluster.probes.run_probe_sweep` on a local Ray of `--cpus` CPUs; Ray's start-up is timed
apart and not counted in the sweep, which runs twice: cold (workers start) and on warm workers.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import time
from pathlib import Path

import numpy as np

from cluster import runtime  # first: sets Ray's environment
from engine.config import ProbeConfig, RayConfig, load
from engine.probes import best_result, fit_and_score, fit_predict, question_folds
from engine.store import open_store, read_split

OUT = Path(__file__).parent / "results" / "probes.json"


def sequential(store: str, mode: str, layers: list[int], cfg: ProbeConfig, seed: int) -> dict:
    root = open_store(store)
    views = {s: read_split(root, s, mode) for s in ("train", "validation", "test")}
    results = []
    for layer in layers:  # each layer read once, as a sensible plain loop does
        X = {s: v.layer(layer) for s, v in views.items()}
        for family in cfg.families:
            for C in cfg.cs:
                evals = {s: (X[s], views[s].seqs) for s in ("validation", "test")}
                out = fit_and_score(X["train"], views["train"].seqs, evals, C, cfg.max_iter, seed, None, family)
                results.append({"family": family, "layer": layer, "C": C, "val_acc": out["acc"]["validation"]})
    best = best_result(results)
    train = views["train"].seqs
    fold = question_folds(train.answer, cfg.folds, seed)
    X = views["train"].layer(best["layer"])
    q = np.arange(train.n_questions)
    for k in range(cfg.folds):
        fit_predict(X, train, q[fold != k], q[fold == k], best["C"], cfg.max_iter, seed, best["family"])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--families", default="logreg,conditional_logit")
    p.add_argument("--cs", default="0.01,0.1")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    cfg = load(args.config)
    store = str(Path(cfg.out_dir) / "activations.zarr")
    root = open_store(store)
    layers = [int(x) for x in root.attrs["layers"]]
    pc = ProbeConfig(cs=tuple(float(c) for c in args.cs.split(",")), folds=cfg.probe.folds, max_iter=cfg.probe.max_iter,
                     families=tuple(args.families.split(",")))
    n_fits = len(pc.families) * len(layers) * len(pc.cs)

    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    seq_best = sequential(store, cfg.prompt.mode, layers, pc, cfg.seed)
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        sequential(store, cfg.prompt.mode, layers, pc, cfg.seed)
    seq1_s = time.perf_counter() - t0

    from cluster.probes import run_probe_sweep

    t0 = time.perf_counter()
    runtime.init(RayConfig(num_cpus=args.cpus, temp_dir="/tmp/probe-kd-bench-ray"))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run_probe_sweep(store, cfg.prompt.mode, layers, list(pc.cs), pc, cfg.seed, None)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # again, on the workers the first sweep started
    run_probe_sweep(store, cfg.prompt.mode, layers, list(pc.cs), pc, cfg.seed, None)
    ray_warm_s = time.perf_counter() - t0
    runtime.shutdown()

    same = (out["best"]["family"], out["best"]["layer"], out["best"]["C"]) == (seq_best["family"], seq_best["layer"], seq_best["C"])
    res = {
        "command": f"python bench/probes.py --config={args.config} --families={args.families} --cs={args.cs} --cpus={args.cpus}",
        "store": store, "mode": cfg.prompt.mode, "fits": n_fits, "folds": pc.folds, "cpus": args.cpus,
        "sequential_s": round(seq_s, 1), "sequential_one_thread_s": round(seq1_s, 1),
        "ratio_ray_over_sequential_one_thread": round(ray_s / seq1_s, 2), "ray_s": round(ray_s, 1),
        "ray_warm_workers_s": round(ray_warm_s, 1), "ray_start_s": round(start_s, 1),
        "ratio_ray_over_sequential": round(ray_s / seq_s, 2), "same_best": same,
        "best": {k: out["best"][k] for k in ("family", "layer", "C", "val_acc", "test_acc")},
        "per_family": {f: {k: b[k] for k in ("layer", "C", "val_acc", "test_acc")}
                       for f in pc.families for b in [best_result([r for r in out["sweep"] if r["family"] == f])]},
        "oof_ece_raw": out["ece_raw"], "oof_ece_calibrated": out["ece_calibrated"], "temperature": out["temperature"],
        "versions": {k: md.version(k) for k in ("ray", "scikit-learn", "scipy", "numpy")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{n_fits} fits + {pc.folds} folds: sequential {seq_s:.1f} s (one thread: {seq1_s:.1f} s), "
          f"Ray {ray_s:.1f} s (+{start_s:.1f} s start-up; {ray_warm_s:.1f} s on warm workers), "
          f"ratio {ray_s / seq_s:.2f}; same best: {same} ({res['best']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
