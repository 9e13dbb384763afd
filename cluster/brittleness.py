"""The brittleness table: the baseline stage's test sample asked under other answer formats and
choice orders (`engine.brittleness`), scored by the teacher's letter logits in vLLM and, in letter
mode, by the chosen probe on the teacher's states at its layer (transformers, stopping at that layer).

Ray must be initialised; the caller passes the running vLLM scorer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import ray

from engine import metrics
from engine.brittleness import Variant, permute, spread, variants
from engine.config import Config
from engine.identity import scores_probe
from engine.probes import best_result, choice_probs, fit_probe
from engine.results import ProbeStage
from engine.sequences import Sequences, build_sequences
from engine.tasks import Example


def variant_sequences(cfg: Config, examples: list[Example], tokenizer,
                      fewshot_pool: list[Example] | None = None) -> list[tuple[Variant, Sequences]]:
    """Letter-prompt sequences of every variant; raises ConfigError for a format the tokenizer cannot
    tell apart, before anything runs."""
    b = cfg.baseline
    out = []
    for v in variants(b.formats, cfg.prompt.answer_format, b.permutations):
        prompt = dataclasses.replace(cfg.prompt, mode="letter", answer_format=v.answer_format)
        out.append((v, build_sequences(permute(examples, cfg.seed, v.permutation), tokenizer, prompt,
                                           fewshot_pool)))
    return out


def _probe_at(run, layer: int, family: str, C: float):
    """The chosen probe refitted on the run's train questions at `layer` (same family, C and seed)."""
    from engine import store
    from engine.config import store_identity

    view = store.read_split(store.open_store(run.store_path, store_identity(run.cfg)), "train", run.cfg.prompt.mode)
    return fit_probe(view.layer(layer), view.seqs, run.train_questions, C, run.cfg.probe.max_iter, run.cfg.seed, family)


def _states(run, layer: int, seqs_list: list[Sequences]) -> list[np.ndarray]:
    """(Q, hidden) teacher states at `layer` for each variant, from one teacher actor that stops there."""
    from cluster.extract import TeacherActor

    e = run.cfg.extract
    actor = ray.remote(TeacherActor).options(num_cpus=e.cpus_per_replica, num_gpus=e.gpus_per_replica)
    actor = actor.remote(run.model_path, run.cfg, [layer], run.tokenizer.pad_token_id, 0)
    try:  # without scores the forward stops at `layer`
        return [ray.get(actor.forward.remote(s, False)).states[:, 0] for s in seqs_list]
    finally:
        ray.kill(actor)


def brittleness(run, asked: list[tuple[Variant, Sequences]], teacher_logp: list[np.ndarray],
                probes: ProbeStage | None) -> dict:
    """Accuracies of every variant: the teacher's from `teacher_logp` ((Q, C_max) letter log-probs per
    variant, from vLLM) and, where the baseline's identity holds the probe's (`engine.identity.scores_probe`:
    letter mode with `baseline.formats`), the probe's: the best single-layer result on validation in the
    probe stage's `per_layer`, refitted on train and applied to each variant's states at its layer. A table
    of choice orders alone has no probe column, whichever command made it and whether `probes` is given, so
    a reused baseline never shows a probe its identity does not name.

    Returns {"n_questions", "probe", "rows": [{variant, answer_format, permutation, teacher_acc,
    probe_acc}], "spread": {"teacher": {...}, "probe": {...} | None}}.
    """
    rows = [{"variant": v.name, "answer_format": v.answer_format, "permutation": v.permutation,
             "teacher_acc": metrics.accuracy(metrics.softmax_rows(lp), seqs.answer), "probe_acc": None}
            for (v, seqs), lp in zip(asked, teacher_logp)]
    probe_info: dict[str, Any] | None = None
    if probes is not None and scores_probe(run.cfg) and asked:
        best = best_result(probes.per_layer)
        layer, family, C = int(best["layer"]), best.get("family", "logreg"), float(best["C"])
        probe = _probe_at(run, layer, family, C)
        for row, (_, seqs), X in zip(rows, asked, _states(run, layer, [s for _, s in asked])):
            row["probe_acc"] = metrics.accuracy(choice_probs(probe, X, seqs), seqs.answer)
        probe_info = {"layer": layer, "family": family, "C": C}
    return {
        "n_questions": int(asked[0][1].n_questions) if asked else 0, "probe": probe_info, "rows": rows,
        "spread": {"teacher": spread([r["teacher_acc"] for r in rows]), "probe": spread([r["probe_acc"] for r in rows])},
    }
