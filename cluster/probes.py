"""Probe sweep on Ray: one task per layer fitting every (family, C) on it, then one task per
cross-fitting fold at the best.

Every task opens the activation store itself and reads only its layer, once, so the driver ships
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
from engine.metrics import accuracy, ece
from engine.probes import (
    apply_temperature,
    best_per_layer,
    best_result,
    fit_and_score,
    fit_predict,
    fit_temperature,
    question_folds,
)


def _thread_env(n: int) -> dict:
    n = str(max(1, int(n)))
    return {"env_vars": {k: n for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}


def _limits(n: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=max(1, int(n)))


def _read(store_path: str, split: str, mode: str, layer: int):
    from engine.store import open_store, read_split

    view = read_split(open_store(store_path), split, mode)
    return view.layer(layer), view.seqs


@ray.remote
def _layer_task(
    store_path: str, mode: str, layer: int, jobs: list[tuple[str, float]], max_iter: int, seed: int,
    train_questions: np.ndarray | None, splits: tuple[str, str, str], threads: int,
) -> list[dict[str, Any]]:
    """Read one layer once, then for every (family, C) in `jobs` fit on train and score validation and
    test. Returns one result (accuracies and probabilities) per job."""
    with _limits(threads):
        t0 = time.perf_counter()
        train_split, val_split, test_split = splits
        train_X, train_seqs = _read(store_path, train_split, mode, layer)
        evals = {name: _read(store_path, name, mode, layer) for name in (val_split, test_split)}
        read_s = time.perf_counter() - t0
        results = []
        for family, C in jobs:
            out = fit_and_score(train_X, train_seqs, evals, C, max_iter, seed, train_questions, family)
            results.append({
                "family": family, "layer": int(layer), "C": float(C), "val_acc": out["acc"][val_split],
                "test_acc": out["acc"][test_split], "val_probs": out["probs"][val_split],
                "test_probs": out["probs"][test_split], "fit_seconds": out["fit_seconds"], "read_seconds": read_s,
                "n_train": out["n_train"],
            })
    return results


@ray.remote
def _fold_task(
    store_path: str, mode: str, layer: int, C: float, max_iter: int, seed: int,
    fit_questions: np.ndarray, held_questions: np.ndarray, train_split: str, threads: int, family: str,
) -> np.ndarray:
    """Fit on `fit_questions`, return (len(held_questions), C_max) probabilities of the held-out fold."""
    with _limits(threads):
        X, seqs = _read(store_path, train_split, mode, layer)
        return fit_predict(X, seqs, fit_questions, held_questions, C, max_iter, seed, family).astype(np.float32)


def _gather(refs: list, describe) -> list:
    """ray.get in completion order with a progress line per result; returns results in `refs` order."""
    index = {r: i for i, r in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = index[done[0]]
        out[i] = ray.get(done[0])
        print(f"[probes] {len(refs) - len(pending)}/{len(refs)} {describe(i, out[i])}", flush=True)
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
    """Sweep (family, layer, C) on validation, then cross-fit the best on train and calibrate it.

    `train_questions` restricts every probe fit (and the OOF labels) to those train questions, in
    that order (None: all). Returns per-layer scores, the best pair, calibrated and raw OOF
    probabilities of the train questions, the temperature, ECE before/after, and the best test probs.
    """
    from engine.store import open_store, read_split

    store_path = str(Path(store_path).resolve())
    train_split, _, test_split = splits
    root = open_store(store_path)
    train_seqs = read_split(root, train_split, mode).seqs
    test_seqs = read_split(root, test_split, mode).seqs
    tq = np.arange(train_seqs.n_questions) if train_questions is None else np.asarray(train_questions, np.int64)
    tq_ref = ray.put(tq)
    env = _thread_env(cpus_per_task)

    # Phase 1: one task per layer (read once), fitting every (family, C) on it.
    t0 = time.perf_counter()
    jobs = [(f, float(C)) for f in cfg.families for C in cs]
    task = _layer_task.options(num_cpus=cpus_per_task, runtime_env=env)
    refs = [task.remote(store_path, mode, int(layer), jobs, cfg.max_iter, seed, tq_ref, tuple(splits), cpus_per_task)
            for layer in layers]

    def describe(i, rs):
        b = best_result(rs)
        return (f"layer {b['layer']}: {len(rs)} fits, best {b['family']} C={b['C']:g} val {b['val_acc']:.2f} "
                f"test {b['test_acc']:.2f} ({sum(r['fit_seconds'] for r in rs):.1f} s)")

    results = [r for rs in _gather(refs, describe) for r in rs]
    sweep_s = time.perf_counter() - t0
    best = best_result(results)
    best_family, best_layer, best_c = best["family"], best["layer"], best["C"]
    print(f"[probes] best on validation: {best_family} layer {best_layer} C={best_c:g} val {best['val_acc']:.3f} "
          f"(test {best['test_acc']:.3f}); sweep {sweep_s:.1f} s", flush=True)

    # Phase 2: cross-fit the best pair, one task per fold of the train questions.
    t1 = time.perf_counter()
    answer = train_seqs.answer[tq]
    fold = question_folds(answer, cfg.folds, seed)
    task = _fold_task.options(num_cpus=cpus_per_task, runtime_env=env)
    fold_refs = [
        task.remote(store_path, mode, best_layer, best_c, cfg.max_iter, seed, tq[fold != k], tq[fold == k],
                    train_split, cpus_per_task, best_family)
        for k in range(cfg.folds)
    ]
    held = _gather(fold_refs, lambda k, p: f"fold {k}: {len(p)} questions held out")
    oof_raw = np.zeros((len(tq), train_seqs.max_choices), dtype=np.float32)
    for k, probs in enumerate(held):
        oof_raw[fold == k] = probs
    crossfit_s = time.perf_counter() - t1

    # Calibration on the held-out (OOF) predictions only.
    summary = ("family", "layer", "C", "val_acc", "test_acc", "fit_seconds")
    T = fit_temperature(oof_raw, answer, is_logits=False)
    oof_cal = apply_temperature(oof_raw, T).astype(np.float32)
    test_cal = apply_temperature(best["test_probs"], T).astype(np.float32)
    out = {
        "per_layer": [{k: r[k] for k in summary} for r in best_per_layer(results)],
        "sweep": [{k: r[k] for k in summary} for r in results],
        "best": {"family": best_family, "layer": best_layer, "C": best_c, "val_acc": best["val_acc"],
                 "test_acc": best["test_acc"]},
        "oof_probs": oof_cal,
        "oof_probs_raw": oof_raw,
        "temperature": T,
        "oof_acc": accuracy(oof_raw, answer),
        "ece_raw": ece(oof_raw, answer),
        "ece_calibrated": ece(oof_cal, answer),
        "test_probs": best["test_probs"],
        "test_probs_calibrated": test_cal,
        "test_ece_raw": ece(best["test_probs"], test_seqs.answer),
        "test_ece_calibrated": ece(test_cal, test_seqs.answer),
        "train_questions": tq,
        "seconds": {"sweep": sweep_s, "crossfit": crossfit_s},
    }
    print(f"[probes] OOF acc {out['oof_acc']:.3f} on {len(tq)} train questions; T={T:.2f} "
          f"ECE {out['ece_raw']:.3f} -> {out['ece_calibrated']:.3f}; cross-fit {crossfit_s:.1f} s", flush=True)
    return out
