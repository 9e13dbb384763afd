"""Probe sweep on Ray: one task per layer fitting every (family, C) on it, optional multi-layer
candidates, then one task per cross-fitting fold at the best (and one for the unlabelled pool).

Every task opens the activation store itself and reads only its layers, once each, so the driver ships
nothing bigger than question indices. Tasks cap BLAS/OpenMP threads at their CPU reservation, so two tasks on
two cores do not oversubscribe. Ray must be initialised by the caller.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from engine.config import ProbeConfig
from engine.log import log, progress
from engine.probes import (
    assemble_oof,
    best_result,
    calibrated_labels,
    combine_members,
    crossfit_plan,
    ensemble_result,
    fit_and_score,
    fit_predict_layers,
    layer_features,
    pool_labels,
    sweep_summary,
)


def _thread_env(n: int) -> dict:
    n = str(max(1, int(n)))
    return {"env_vars": {k: n for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}


def _limits(n: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=max(1, int(n)))


def _read(store_path: str, split: str, mode: str, layers: list[int]):
    """({layer: (rows, hidden) states}, Sequences) of one split, each layer read once."""
    from engine.store import open_store, read_split

    view = read_split(open_store(store_path), split, mode)
    return {int(layer): view.layer(int(layer)) for layer in layers}, view.seqs


@ray.remote
def _fit_task(
    store_path: str, mode: str, layers: list[int], jobs: list[tuple[str, float]], max_iter: int, seed: int,
    train_questions: np.ndarray | None, splits: tuple[str, str, str], threads: int,
) -> list[dict[str, Any]]:
    """Read `layers` once, then for every (family, C) in `jobs` fit on train and score validation and
    test. One layer: a single-layer probe; several: the 'concat' candidate on their states side by side.
    Returns one result (accuracies and probabilities) per job."""
    with _limits(threads):
        t0 = time.perf_counter()
        train_split, val_split, test_split = splits
        states, train_seqs = _read(store_path, train_split, mode, layers)
        train_X = layer_features(states, layers)
        evals = {}
        for name in (val_split, test_split):
            split_states, seqs = _read(store_path, name, mode, layers)
            evals[name] = (layer_features(split_states, layers), seqs)
        read_s = time.perf_counter() - t0
        single = len(layers) == 1
        results = []
        for family, C in jobs:
            out = fit_and_score(train_X, train_seqs, evals, C, max_iter, seed, train_questions, family)
            results.append({
                "family": family, "combine": None if single else "concat", "layer": int(layers[0]) if single else None,
                "layers": [int(x) for x in layers], "C": float(C), "val_acc": out["acc"][val_split],
                "test_acc": out["acc"][test_split], "val_probs": out["probs"][val_split],
                "test_probs": out["probs"][test_split], "fit_seconds": out["fit_seconds"], "read_seconds": read_s,
                "n_train": out["n_train"],
            })
    return results


@ray.remote
def _fold_task(
    store_path: str, mode: str, layers: list[int], combine: str | None, C: float, max_iter: int, seed: int,
    fit_questions: np.ndarray, held_questions: np.ndarray, train_split: str, threads: int, family: str,
) -> np.ndarray:
    """Fit the candidate (`layers`, `combine`) on `fit_questions`, return (len(held_questions), C_max)
    probabilities of the held-out questions (a cross-fitting fold, or the unlabelled pool)."""
    with _limits(threads):
        states, seqs = _read(store_path, train_split, mode, layers)
        return fit_predict_layers(states, layers, combine, seqs, fit_questions, held_questions, C, max_iter, seed,
                                  family).astype(np.float32)


def _gather(refs: list, describe) -> list:
    """ray.get in completion order with a progress bar (or a line per result, see engine.log.progress);
    returns results in `refs` order."""
    index = {r: i for i, r in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    with progress("probes", len(refs), "task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            out[i] = ray.get(done[0])
            log("probes", f"{len(refs) - len(pending)}/{len(refs)} {describe(i, out[i])}", bar.line_level)
            bar.update(1)
    return out


def _name(r: dict) -> str:
    """'logreg layer 5' or 'concat of logreg layers 2+5'."""
    if r["layer"] is not None:
        return f"{r['family']} layer {r['layer']}"
    return f"{r['combine']} of {r['family']} layers {'+'.join(str(x) for x in r['layers'])}"


def _combined(results: list[dict], cfg: ProbeConfig, submit, val_seqs, test_seqs) -> list[dict]:
    """The multi-layer candidates of `cfg.combine` over the `cfg.combine_layers` best layers (on validation)
    of the best single-layer family and C: 'ensemble' from phase-1 probabilities, 'concat' as one task."""
    if not cfg.combine:
        return []
    top = best_result(results)
    members = combine_members(results, cfg.combine_layers, top["family"], top["C"])
    out = []
    if "concat" in cfg.combine:
        out += _gather([submit(members, [(top["family"], top["C"])])], lambda i, rs: _name(rs[0]) + " fitted")[0]
    if "ensemble" in cfg.combine:
        by_layer = {r["layer"]: r for r in results if r["family"] == top["family"] and r["C"] == top["C"] and r["layer"] is not None}
        out.append(ensemble_result([by_layer[layer] for layer in members], val_seqs, test_seqs))
    for r in out:
        log("probes", f"{_name(r)} C={r['C']:g}: val {r['val_acc']:.3f} test {r['test_acc']:.3f}")
    return out


def run_probe_sweep(
    store_path: str,
    mode: str,
    layers: list[int],
    cs: list[float],
    cfg: ProbeConfig,
    seed: int,
    train_questions: np.ndarray | None,
    splits: tuple[str, str, str] = ("train", "validation", "test"),
    cpus_per_task: int = 1,
) -> dict[str, Any]:
    """Sweep (family, layer, C) and the `cfg.combine` multi-layer candidates on validation, then
    cross-fit the best on train and calibrate it.

    `train_questions` restricts every probe fit (and the OOF labels) to those labelled train questions,
    in that order (None: all). Returns per-layer scores, every candidate, the best, calibrated and raw
    OOF probabilities of the train questions, the temperature, ECE before/after, and the best test
    probs. With `cfg.label_pool`, the other train questions are the pool: the best probe fitted on all
    labelled questions predicts them (`pool_*`); their gold answers are read only for `pool_acc`/`pool_ece`.
    """
    from engine.store import open_store, read_split

    store_path = str(Path(store_path).resolve())
    train_split, val_split, test_split = splits
    root = open_store(store_path)
    train_seqs = read_split(root, train_split, mode).seqs
    val_seqs = read_split(root, val_split, mode).seqs
    test_seqs = read_split(root, test_split, mode).seqs
    tq = np.arange(train_seqs.n_questions) if train_questions is None else np.asarray(train_questions, np.int64)
    pool = np.setdiff1d(np.arange(train_seqs.n_questions), tq) if cfg.label_pool else None
    if pool is not None and not len(pool):
        raise ValueError("probe.label_pool: every train question is labelled, so the pool is empty; lower data.train_fraction")
    tq_ref = ray.put(tq)
    env = _thread_env(cpus_per_task)

    # Phase 1: one task per layer (read once), fitting every (family, C) on it; then the multi-layer candidates.
    t0 = time.perf_counter()
    jobs = [(f, float(C)) for f in cfg.families for C in cs]
    task = _fit_task.options(num_cpus=cpus_per_task, runtime_env=env)

    def submit(task_layers, task_jobs):
        return task.remote(store_path, mode, [int(x) for x in task_layers], task_jobs, cfg.max_iter, seed, tq_ref,
                           tuple(splits), cpus_per_task)

    def describe(i, rs):
        b = best_result(rs)
        return (f"layer {b['layer']}: {len(rs)} fits, best {b['family']} C={b['C']:g} val {b['val_acc']:.2f} "
                f"test {b['test_acc']:.2f} ({sum(r['fit_seconds'] for r in rs):.1f} s)")

    results = [r for rs in _gather([submit([layer], jobs) for layer in layers], describe) for r in rs]
    results += _combined(results, cfg, submit, val_seqs, test_seqs)
    sweep_s = time.perf_counter() - t0
    best = best_result(results)
    best_family, best_layers, best_combine, best_c = best["family"], best["layers"], best["combine"], best["C"]
    log("probes", f"best on validation: {_name(best)} C={best_c:g} val {best['val_acc']:.3f} "
          f"(test {best['test_acc']:.3f}); sweep {sweep_s:.1f} s")

    # Phase 2: cross-fit the best, one task per fold of the labelled train questions (+ one for the pool).
    t1 = time.perf_counter()
    answer = train_seqs.answer[tq]
    fold, plan = crossfit_plan(tq, answer, cfg.folds, seed, pool)  # the pool, if any, is only predicted
    task = _fold_task.options(num_cpus=cpus_per_task, runtime_env=env)
    refs = [task.remote(store_path, mode, best_layers, best_combine, best_c, cfg.max_iter, seed, fit_q, held_q,
                        train_split, cpus_per_task, best_family) for fit_q, held_q in plan]
    held = _gather(refs, lambda k, p: f"fold {k}: {len(p)} questions held out" if k < cfg.folds else f"pool: {len(p)} questions predicted")
    oof_raw = assemble_oof(fold, held[: cfg.folds], train_seqs.max_choices)
    crossfit_s = time.perf_counter() - t1

    out = {**sweep_summary(results, best),
           **calibrated_labels(oof_raw, answer, best["test_probs"], test_seqs.answer),
           "train_questions": tq, "seconds": {"sweep": sweep_s, "crossfit": crossfit_s}}
    log("probes", f"OOF acc {out['oof_acc']:.3f} on {len(tq)} train questions; T={out['temperature']:.2f} "
          f"ECE {out['ece_raw']:.3f} -> {out['ece_calibrated']:.3f}; cross-fit {crossfit_s:.1f} s")
    if pool is not None:
        out.update(pool_labels(held[-1], out["temperature"], pool, train_seqs.answer[pool]))
        log("probes", f"pseudo-labels on {len(pool)} pool questions: acc {out['pool_acc']:.3f} "
              f"ECE {out['pool_ece']:.3f} (withheld gold, reported only)")
    return out
