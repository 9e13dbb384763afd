"""`distill bench`: students under every label source, train fraction and seed, on every dataset, in two
student regimes: the whole matrix in `bench.finetune` (heads on cached frozen features by default) and a
declared slice in `bench.slice_finetune` (full fine-tuning by default), reported side by side.

    <out_dir>/<dataset>/activations.zarr     one store per dataset: extracted once, then only read
    <out_dir>/<dataset>/probes-<id>/         one probe sweep per (fraction, seed) cell, shared by the regimes
    <out_dir>/<dataset>/students/<src>-<id>  one student per (regime, source, fraction, seed) cell
    <out_dir>/bench.{json,md}, bench_<dataset>.png, bench_<dataset>_diff.png

A cell's config is the dataset's config with `seed`, `data.train_fraction`, `probe.label_pool` (on below a
fraction of 1 when a pseudo source is in the matrix), the regime and the sources it trains (`cell_config`).
Every probe sweep and student is an artifact keyed by its identity, so a rerun, or a larger matrix over
the same stores, computes only the cells it lacks, and never the teacher: an interrupted matrix resumes
where it stopped. A dataset's missing students train in Ray Train runs (`pipeline.train_plans`): one per
regime, or `bench.parallel_runs` at once on a cluster, each with a share of the cells.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from cluster import pipeline
from engine import artifacts, bench, hardware, metrics
from engine.config import Config, config_hash, to_dict
from engine.labels import SOURCES
from engine.log import progress
from engine.tasks import benchmark_data


def dataset_config(cfg: Config, dataset: str) -> Config:
    """`cfg` aimed at one benchmark dataset: its honest splits, and its own folder under `out_dir`."""
    data = benchmark_data(cfg.data, dataset, cfg.bench.data_root)
    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / dataset), data=data)


def cell_config(cfg: Config, seed: int, fraction: float, *, finetune: str | None = None,
                sources: tuple[str, ...] | None = None) -> Config:
    """The config of one (seed, fraction) cell in one regime (`finetune`, default `bench.finetune`),
    training `sources` (default `bench.sources`). The pseudo sources train only where a pool exists
    (fraction < 1); the probe sweep makes the pool's labels whenever the matrix has a pseudo source, so
    every regime's cell shares one sweep."""
    sources = tuple(cfg.bench.sources if sources is None else sources)
    sources = tuple(s for s in sources if not SOURCES[s].pseudo or fraction < 1.0)
    pool = fraction < 1.0 and any(SOURCES[s].pseudo for s in cfg.bench.sources)
    return dataclasses.replace(
        cfg,
        seed=seed,
        data=dataclasses.replace(cfg.data, train_fraction=fraction),
        probe=dataclasses.replace(cfg.probe, label_pool=pool),
        student=dataclasses.replace(cfg.student, label_sources=sources,
                                    finetune=cfg.bench.finetune if finetune is None else finetune),
    )


def regimes(cfg: Config, dataset: str) -> list[tuple[str, tuple[str, ...], tuple[float, ...], tuple[int, ...]]]:
    """(finetune, sources, fractions, seeds) of the matrix and, where the dataset is in it, the slice."""
    b = cfg.bench
    out = [(b.finetune, tuple(b.sources), tuple(b.fractions), tuple(b.seeds))]
    if dataset in b.slice_datasets:
        out.append((b.slice_finetune, tuple(b.slice_sources), tuple(b.slice_fractions), tuple(b.slice_seeds)))
    return out


def bench_dataset(cfg: Config, dataset: str) -> tuple[list[dict], dict, dict, dict]:
    """Every cell of one dataset: (cell records, their test correctness by `bench.key`, reference
    accuracies for the tables and plots, seconds per stage)."""
    dcfg = dataset_config(cfg, dataset)
    run = pipeline.Run(dcfg)
    run.check_inputs()
    t0 = time.perf_counter()
    pipeline.extract(run)  # reused once committed; resumed if a partial store is there
    seconds = {"extract": round(time.perf_counter() - t0, 1)}
    logp, test = pipeline.teacher_logp(run, "test")
    refs = {"teacher": metrics.accuracy(metrics.softmax_rows(logp), test.answer), "n_test": int(test.n_questions),
            "chance": float((1.0 / test.n_choices).mean()), "probe": {}, "probe_choice": {}}
    t0 = time.perf_counter()
    plans, seen, probed = [], set(), set()
    grid = [(finetune, sources, seed, fraction) for finetune, sources, fractions, seeds in regimes(cfg, dataset)
             for seed in seeds for fraction in fractions]
    with progress("bench", len(grid), "cell") as bar:  # probed and planned; the students train after
        for finetune, sources, seed, fraction in grid:
            crun = run.variant(cell_config(dcfg, seed, fraction, finetune=finetune, sources=sources))
            probes = pipeline.probe(crun)
            if (seed, fraction) not in probed:
                probed.add((seed, fraction))
                best = probes.best
                refs["probe"].setdefault(fraction, []).append(best["test_acc"])
                refs["probe_choice"].setdefault(fraction, []).append(
                    {k: best.get(k) for k in ("family", "combine", "layer", "layers", "C")} | {"seed": seed})
            for plan in pipeline.student_plans(crun, probes):
                if plan.where not in seen:  # a slice in the matrix's own regime is the matrix's cell
                    seen.add(plan.where)
                    plans.append(plan)
            bar.update(1)
    seconds["probes"] = round(time.perf_counter() - t0, 1)
    pipeline.log("bench", f"{dataset}: {sum(p.job is not None for p in plans)} of {len(plans)} students to train")
    t0 = time.perf_counter()
    students = pipeline.train_plans(run, plans, parallel_runs=cfg.bench.parallel_runs)
    seconds["students"] = round(time.perf_counter() - t0, 1)
    cells, correct = [], {}
    for plan, s in zip(plans, students, strict=True):
        cell = {"dataset": dataset, "regime": plan.cfg.student.finetune, "source": plan.source,
                "fraction": plan.cfg.data.train_fraction, "seed": plan.cfg.seed, "test_acc": s.test_acc,
                "n_train": s.n_train, "train_label_acc": s.train_label_acc, "val_acc": s.val_acc,
                "best_epoch": s.best_epoch, "train_seconds": s.train_seconds, "artifact": s.artifact}
        probs = np.load(plan.where / "test_probs.npy", allow_pickle=False)
        correct[bench.key(cell)] = probs.argmax(1) == test.answer
        cells.append(cell)
    return cells, correct, refs, seconds


def run_bench(cfg: Config) -> dict:
    """The whole matrix, then `bench.json`, `bench.md` and the plots under `out_dir`."""
    t0 = time.perf_counter()
    cells, correct, refs, seconds = [], {}, {}, {}
    for dataset in cfg.bench.datasets:
        t1 = time.perf_counter()
        got, right, refs[dataset], stages = bench_dataset(cfg, dataset)
        cells += got
        correct |= right
        seconds[dataset] = {"total": round(time.perf_counter() - t1, 1), **stages}
    summary = bench.summarise(cells, correct, resamples=cfg.bench.resamples)
    pairs = bench.paired(cells, correct, resamples=cfg.bench.resamples)
    out = Path(cfg.out_dir)
    results = {
        "config_hash": config_hash(cfg), "config": to_dict(cfg), "wall_seconds": round(time.perf_counter() - t0, 1),
        "dataset_seconds": seconds, "dtypes": hardware.resolve(cfg)[1],
        "machine": {"cpu_flags": hardware.matmul_flags()}, "versions": pipeline.versions(),
        "refs": refs, "summary": summary, "pairs": pairs, "cells": cells,
    }
    artifacts.write_json(out / "bench.json", results)
    (out / "bench.md").write_text(bench.markdown(summary, pairs, refs) + "\n## Verdicts\n\n" + bench.verdicts(pairs))
    plots = bench.plot(summary, pairs, refs, out)
    pipeline.log("bench", f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(plots)} plots "
                          f"in {results['wall_seconds']:.0f}s")
    return results
