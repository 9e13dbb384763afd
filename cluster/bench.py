"""`distill bench`: students under every label source, train fraction and seed, on every dataset.

    <out_dir>/<dataset>/activations.zarr     one store per dataset: extracted once, then only read
    <out_dir>/<dataset>/probes-<id>/         one probe sweep per (fraction, seed) cell
    <out_dir>/<dataset>/students/<src>-<id>  one student per (source, fraction, seed) cell
    <out_dir>/bench.{json,md}, bench_<dataset>.png

A cell's config is the dataset's config with `seed`, `data.train_fraction`, `probe.label_pool` (on below
a fraction of 1 when 'probe_pseudo' is compared) and the sources it trains (`cell_config`). Each cell's
probe sweep and students are artifacts keyed by their identity, so a rerun, or a larger matrix over
the same stores, computes only the cells it lacks, and never the teacher. A dataset's missing students
train in one Ray Train run (`pipeline.train_plans`), which pays the worker start-up once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from cluster import pipeline
from engine import artifacts, bench, metrics
from engine.config import Config, config_hash, to_dict
from engine.tasks import benchmark_data


def dataset_config(cfg: Config, dataset: str) -> Config:
    """`cfg` aimed at one benchmark dataset: its honest splits, and its own folder under `out_dir`."""
    data = benchmark_data(cfg.data, dataset, cfg.bench.data_root)
    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / dataset), data=data)


def cell_config(cfg: Config, seed: int, fraction: float) -> Config:
    """The config of one (seed, fraction) cell: 'probe_pseudo' only where a pool exists (fraction < 1)."""
    sources = tuple(s for s in cfg.bench.sources if s != "probe_pseudo" or fraction < 1.0)
    pool = fraction < 1.0 and "probe_pseudo" in sources
    return dataclasses.replace(
        cfg,
        seed=seed,
        data=dataclasses.replace(cfg.data, train_fraction=fraction),
        probe=dataclasses.replace(cfg.probe, label_pool=pool),
        student=dataclasses.replace(cfg.student, label_sources=sources),
    )


def bench_dataset(cfg: Config, dataset: str) -> tuple[list[dict], dict]:
    """Every cell of one dataset: (cell records, reference accuracies for the plots and tables)."""
    dcfg = dataset_config(cfg, dataset)
    run = pipeline.Run(dcfg)
    run.check_inputs()
    pipeline.extract(run)  # reused once committed; resumed if a partial store is there
    logp, test = pipeline.teacher_logp(run, "test")
    refs = {"teacher": metrics.accuracy(metrics.softmax_rows(logp), test.answer),
            "chance": float((1.0 / test.n_choices).mean()), "probe": {}, "probe_choice": {}}
    plans, cells = [], []
    for seed in cfg.bench.seeds:
        for fraction in cfg.bench.fractions:
            crun = run.variant(cell_config(dcfg, seed, fraction))
            meta, arrays = pipeline.probe(crun)
            best = meta["best"]
            refs["probe"].setdefault(fraction, []).append(best["test_acc"])
            refs["probe_choice"].setdefault(fraction, []).append(
                {k: best.get(k) for k in ("family", "combine", "layer", "layers", "C")} | {"seed": seed})
            plans += pipeline.student_plans(crun, arrays)
    pipeline.log("bench", f"{dataset}: {sum(p.job is not None for p in plans)} of {len(plans)} students to train")
    for plan, meta in zip(plans, pipeline.train_plans(run, plans), strict=True):
        cells.append({"dataset": dataset, "source": plan.source, "fraction": plan.cfg.data.train_fraction,
                      "seed": plan.cfg.seed, "test_acc": meta["test_acc"], "n_train": meta["n_train"],
                      "train_label_acc": meta["train_label_acc"]})
    return cells, refs


def run_bench(cfg: Config) -> dict:
    """The whole matrix, then `bench.json`, `bench.md` and one plot per dataset under `out_dir`."""
    t0 = time.perf_counter()
    cells, refs, seconds = [], {}, {}
    for dataset in cfg.bench.datasets:
        t1 = time.perf_counter()
        got, refs[dataset] = bench_dataset(cfg, dataset)
        cells += got
        seconds[dataset] = round(time.perf_counter() - t1, 1)
    summary = bench.summarise(cells)
    out = Path(cfg.out_dir)
    results = {
        "config_hash": config_hash(cfg), "config": to_dict(cfg), "wall_seconds": round(time.perf_counter() - t0, 1),
        "dataset_seconds": seconds, "versions": pipeline.versions(), "refs": refs, "summary": summary, "cells": cells,
    }
    artifacts.write_json(out / "bench.json", results)
    (out / "bench.md").write_text(bench.markdown(summary, refs) + "\n")
    plots = bench.plot(summary, refs, out)
    pipeline.log("bench", f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(plots)} plots "
                          f"in {results['wall_seconds']:.0f}s")
    return results
