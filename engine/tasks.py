"""Multiple-choice tasks: rows from local files or the hub, mapped by a task spec, validated, subsetted.

Every row ends up in the shared schema of shared/data/README.md:

    {"id": str, "question": str, "choices": [str, ...], "answer": int (0-based), "subject": str | null}

How a source row gives those fields is a task spec (`engine/taskspec.py`, YAML under
`engine/taskspecs/`, `distill tasks` lists them): `data.task` names one, or the path of your own. With
no task, a local folder is read in the shared schema and a hub id by the built-in spec whose
`dataset_path` (and `dataset_name`) it matches. Where the rows are is `data.source`: a local folder
holding `<split>.jsonl|.json|.csv|.parquet`, or a hub id read with HF `datasets`. Bad rows raise
`DataError` naming the file and line (or hub row), the field (and the spec's field) and the fix.
`datasets` is imported only when a hub split or a parquet file is read, so `Example` stays cheap to import.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.config import DataConfig, parse_split
from engine.taskspec import RowError, SpecError, TaskSpec, builtin_specs, load_spec, map_row


@dataclass(frozen=True)
class Example:
    """One multiple-choice question in the shared schema."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    """0-based index of the correct choice."""
    subject: Optional[str] = None


class DataError(ValueError):
    """A data file or row is wrong; the message names the file (and line), the field and the fix."""


def _bad(where: str, name: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: field {name!r}: {problem}; {fix}")


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
REQUIRED = ("id", "question", "choices", "answer")
LOCAL_HINT = (
    "local files must be in the shared schema (id, question, choices, answer, subject; see "
    "shared/data/README.md), or set data.task to a spec of their layout (`distill tasks` lists the "
    "built-in ones, e.g. arc_original for ARC's original JSONL)"
)


# ---------------------------------------------------------------------------------------------
# Which spec reads a source


def task_spec(data: DataConfig) -> TaskSpec:
    """The spec `data.task` names; with none, the shared schema for a local source, or the built-in spec
    whose dataset_path (and dataset_name, by `data.hub_config` or `data.dataset`) is `data.source`."""
    try:
        if data.task:
            return load_spec(data.task)
        if _is_local(data.source):
            return load_spec("shared")
        matches = [spec for spec in map(load_spec, builtin_specs()) if spec.dataset_path == data.source]
    except SpecError as err:
        raise DataError(str(err)) from None
    for spec in matches:
        if data.hub_config and spec.dataset_name == data.hub_config:
            return spec
    for spec in matches:
        if spec.task == data.dataset or len(matches) == 1:
            return spec
    hubs = sorted({s.dataset_path for s in map(load_spec, builtin_specs()) if s.dataset_path and not _is_local(s.dataset_path)})
    raise DataError(
        f"data.task: no built-in task spec reads hub id {data.source!r} as dataset {data.dataset!r} (built-in hub "
        f"layouts: {', '.join(hubs)}). Write a spec YAML for its layout and set data.task to its path")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------
# Loading a split


def load_split(data: DataConfig, split: str) -> list[Example]:
    """Read one split as validated `Example`s, in file order, cut to `data.limit` rows.

    `data.source` is a local folder holding `<split>.jsonl|.json|.csv|.parquet`, or a hub id read with
    `datasets.load_dataset(source, config, split=split, revision=...)`; each row is mapped by the task
    spec (`task_spec`). Raises `DataError` on bad input.
    """
    spec = task_spec(data)
    folder = Path(data.source).expanduser()
    if folder.is_dir():
        path = _split_file(folder, split)
        rows = {".parquet": _read_parquet, ".csv": _read_csv}.get(path.suffix, _read_json)(path)
    elif _is_local(data.source):
        what = "is a file" if folder.exists() else "does not exist"
        raise DataError(
            f"data.source: {data.source!r} {what}; point it at a folder holding <split>.jsonl, .json, .csv or "
            f".parquet (relative paths are relative to the working directory), or give a hub id"
        )
    else:
        rows = _read_hub(data, spec, split)
    if spec.is_shared_schema:
        examples = _validate(rows, LOCAL_HINT if folder.is_dir() else f"the hub rows of {data.source!r} are not "
                             "in the shared schema; set data.task to a spec of their layout")
    else:
        examples = _validate(_mapped(spec, rows, split), f"check the rows against spec {spec.task} ({spec.path})")
    return examples[: data.limit] if data.limit is not None else examples


def _mapped(spec: TaskSpec, rows: list[tuple[str, Any]], split: str) -> list[tuple[str, Any]]:
    """Rows mapped onto the shared schema by `spec` (filtered rows dropped); a row it cannot map is a
    DataError naming the spec's field, the spec file, and the row."""
    out = []
    for number, (where, row) in enumerate(rows, start=1):
        try:
            mapped = map_row(spec, row, split, number)
        except RowError as err:
            key = err.key.split("[")[0]
            given = getattr(spec, key, None)
            raise DataError(
                f"{where}: field {err.key!r} of task spec {spec.task} ({spec.path}, {key}: {given!r}): {err}; fix the "
                f"row, or the spec's {key}") from None
        if mapped is not None:
            out.append((where, mapped))
    return out


def _split_file(folder: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path
    present = sorted(p.name for p in folder.iterdir() if p.is_file()) or ["(no files)"]
    raise DataError(
        f"{folder}: no file for split {split!r} (looked for {', '.join(split + s for s in SUFFIXES)}); "
        f"files there: {', '.join(present)}. Set data.train_split/validation_split/test_split "
        f"to a split that exists"
    )


def _read_json(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs from JSON lines, or from one JSON array in a .json file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the JSON array") from exc
        return [(f"{path} item {i}", row) for i, row in enumerate(rows, start=1)]
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                f"each line must hold one complete JSON object"
            ) from exc
    return out


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs from a CSV file with a header line; every value is text (a spec reads it)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [(f"{path}:{i}", dict(row)) for i, row in enumerate(csv.DictReader(f), start=2)]


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs read through HF datasets; its cache lives in a temp dir, not by the data."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="probe-kd-datasets-") as cache:
        ds = datasets.load_dataset(
            "parquet", data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
        )
        rows = ds.to_list()
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_hub(data: DataConfig, spec: TaskSpec, split: str) -> list[tuple[str, Any]]:
    """Raw rows of a hub split (the spec maps them). `data.hub_config` overrides the spec's dataset_name."""
    import datasets

    config = data.hub_config or spec.dataset_name
    try:
        ds = datasets.load_dataset(data.source, config, split=split, revision=spec.revision)
    except Exception as exc:
        raise DataError(
            f"data.source: could not load {data.source!r} (config {config!r}, split {split!r}) from "
            f"the hub: {type(exc).__name__}: {exc}. Check the hub id, data.hub_config and the split "
            f"names, or point data.source at a local folder"
        ) from exc
    where = f"{data.source} ({config}) split {split!r}"
    return [(f"{where} row {i + 1}", dict(row)) for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# Validation: shared-schema dicts -> Examples


def read_questions(path: str | Path) -> list[Example]:
    """Questions to predict from one .jsonl / .json / .parquet file in the shared schema. `answer` may be
    left out (the Example then holds -1); anything else wrong raises `DataError` naming the row and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .jsonl, .json or .parquet file of questions")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json(path)
    if not rows:
        raise DataError(f"{path}: holds no questions")
    hint = "rows must be in the shared schema (id, question, choices; answer optional); see shared/data/README.md"
    return _validate(rows, hint, answer_required=False)


def _validate(rows: list[tuple[str, Any]], hint: str, answer_required: bool = True) -> list[Example]:
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for where, row in rows:
        ex = _example(row, where, hint, answer_required)
        if ex.id in first_seen:
            raise _bad(where, "id", f"{ex.id!r} is already used at {first_seen[ex.id]}",
                       "ids must be unique within a split")
        first_seen[ex.id] = where
        examples.append(ex)
    return examples


def _example(row: Any, where: str, hint: str, answer_required: bool = True) -> Example:
    """Check one shared-schema row and build its Example. Extra fields are ignored."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}, got {type(row).__name__}")
    if not answer_required and "answer" not in row:
        row = {**row, "answer": None}
    for name in REQUIRED:
        if name not in row:
            raise _bad(where, name, "missing", hint)
    id_, question, choices, answer = (row[k] for k in REQUIRED)
    subject = row.get("subject")
    if not isinstance(id_, str) or not id_.strip():
        raise _bad(where, "id", f"{id_!r} is not a non-empty string", "give every row a unique string id")
    if not isinstance(question, str) or not question.strip():
        raise _bad(where, "question", f"{question!r} is not a non-empty string", "give the question text")
    if not isinstance(choices, (list, tuple)):
        raise _bad(where, "choices", f"{type(choices).__name__} {choices!r} is not a list", "give a list of choice strings")
    if len(choices) < 2:
        raise _bad(where, "choices", f"has {len(choices)} choice(s)", "give at least 2 choices")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise _bad(where, "choices", f"choice {j} is {choice!r}", "every choice must be a non-empty string")
    if answer is None and not answer_required:
        answer = -1
    elif isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        raise _bad(where, "answer", f"{answer!r} ({type(answer).__name__}) is not an integer",
                   "answers are 0-based int indices into 'choices' (e.g. 2, not 'C' or '2')")
    if not (0 <= answer < len(choices) or (answer == -1 and not answer_required)):
        raise _bad(where, "answer", f"{answer} is out of range for {len(choices)} choices",
                   "answers are 0-based indices into 'choices'")
    if subject is not None and not isinstance(subject, str):
        raise _bad(where, "subject", f"{subject!r} is not a string", "give a string or null")
    return Example(id=id_, question=question, choices=tuple(choices), answer=int(answer), subject=subject)


# ---------------------------------------------------------------------------------------------
# Subsets


def stratified_subset(answers: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of size round(fraction * n), stratified by answer value.

    Every present class keeps at least one row. Each class is shuffled once by `seed`, and rows
    are taken in one fixed order (Webster apportionment: a class's k-th row comes at priority
    n_class / (2k + 1)), so a subset is always a prefix of that order: smaller fractions with the
    same seed give subsets of larger ones. fraction 1.0 returns every index.
    """
    answers = np.asarray(answers)
    n = len(answers)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or n == 0:
        return np.arange(n)
    _, cls, counts = np.unique(answers, return_inverse=True, return_counts=True)
    cls = cls.reshape(-1)
    size = min(n, max(round(fraction * n), len(counts)))
    rng = np.random.default_rng(seed)
    rank = np.empty(n, dtype=np.int64)
    for c in range(len(counts)):
        rank[rng.permutation(np.flatnonzero(cls == c))] = np.arange(counts[c])
    priority = np.where(rank == 0, np.inf, counts[cls] / (2 * rank + 1))
    order = np.lexsort((rank, cls, -priority))
    return np.sort(order[:size])


def select_train(examples: list[Example], data: DataConfig, seed: int) -> list[Example]:
    """The train rows kept under `data.train_fraction`, stratified by answer and seeded."""
    if data.train_fraction >= 1.0:
        return list(examples)
    idx = stratified_subset(np.array([ex.answer for ex in examples]), data.train_fraction, seed)
    return [examples[i] for i in idx]


# The benchmark's datasets: hub id, and honest (train, validation, test) roles. MMLU has no train split:
# train on validation, pick on dev, report on test. AQuA-RAT here has validation and test only: train
# on validation, pick on a seeded 30% of test, report on the other 70%.
BENCHMARK_SPLITS = {
    "arc_easy": ("allenai/ai2_arc", ("train", "validation", "test")),
    "arc_challenge": ("allenai/ai2_arc", ("train", "validation", "test")),
    "mmlu": ("cais/mmlu", ("validation", "dev", "test")),
    "aqua_rat": ("deepmind/aqua_rat", ("validation", "test[:30%]", "test[30%:]")),
}


def benchmark_data(data: DataConfig, dataset: str, root: str | None) -> DataConfig:
    """`data` (its caps and seeds) pointed at one benchmark dataset with its honest splits: the local
    folder `<root>/<dataset>`, or the hub id when `root` is null."""
    if dataset not in BENCHMARK_SPLITS:
        raise DataError(f"bench.datasets: unknown dataset {dataset!r}; choose from {sorted(BENCHMARK_SPLITS)}")
    hub, (train, validation, test) = BENCHMARK_SPLITS[dataset]
    source = str(Path(root) / dataset) if root else hub
    return replace(data, dataset=dataset, source=source, hub_config=None, train_split=train,
                   validation_split=validation, test_split=test)


ROLES = ("train", "validation", "test")


def carve(n: int, lo: float, hi: float, seed: int) -> np.ndarray:
    """Sorted indices of the [lo, hi) slice of n rows taken in a seeded random order. Slices of one
    order that do not overlap share no row, and together [0, a) and [a, 1) cover every row."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[int(round(lo * n)):int(round(hi * n))])


def load_role(data: DataConfig, role: str) -> list[Example]:
    """The split playing `role` ('train', 'validation' or 'test'): the whole split or its slice
    (`parse_split`), then cut to `data.max_<role>` rows by a seeded sample stratified by answer, and by
    subject too where every row has one (MMLU: each subject keeps its share; rows keep their file order)."""
    split, lo, hi = parse_split(getattr(data, f"{role}_split"), f"data.{role}_split")
    examples = load_split(data, split)
    if (lo, hi) != (0.0, 1.0):
        examples = [examples[i] for i in carve(len(examples), lo, hi, data.split_seed)]
    cap = getattr(data, f"max_{role}")
    if cap is None or cap >= len(examples):
        return examples
    strata = [ex.answer for ex in examples]
    if all(ex.subject for ex in examples):
        strata = [f"{ex.subject}|{ex.answer}" for ex in examples]
    idx = stratified_subset(np.array(strata), cap / len(examples), data.sample_seed)
    return [examples[i] for i in idx]
