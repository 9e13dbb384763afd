"""Multiple-choice tasks as YAML specs, not code: where the rows come from and how a row gives the
question, its choices and its answer. The vocabulary follows lm-evaluation-harness's task YAML where
it can (`task`, `dataset_path`, `dataset_name`, `revision`, `training_split`, ...).

    task: openbookqa                       # the spec's name (`distill tasks` lists the built-in ones)
    description: OpenBookQA, main config
    dataset_path: allenai/openbookqa       # the canonical source: a hub id, or a local folder/file
    dataset_name: main                     # hub config (optional)
    revision: null                         # hub revision (optional)
    training_split: train                  # which split plays each role (validation/test likewise)
    question: question_stem                # a field path or a Jinja template
    choices: choices.text                  # a field path, a template rendering a list, or a list of either
    answer: answerKey                      # a field path or a template ...
    answer_type: label                     # ... giving an index, a label (among `labels`) or the answer text
    labels: choices.label                  # answer_type label: the row's labels (default A, B, C, ...)
    id: id                                 # optional; default '<task>/<split>/<row number>'
    subject: null                          # optional field path or template
    filter: null                           # optional template; a row is kept when it renders 'True'

Field paths reach into nested rows: `question.stem`, `question.choices[].text` (that field of every
item of a list), `options[0]`. A value holding `{{` or `{%` is a Jinja template, rendered in a sandbox
with the row's fields as variables (StrictUndefined: a missing field is an error, not ''); a template
for `choices` renders a list literal (`{{ [sol1, sol2] }}`), parsed without eval. Two filters are
added: `after(sep)` (the text after the first `sep`: 'A)21' -> '21') and `strip`.

Where the rows come from is `data.source` (a local folder holding `<split>.jsonl|.json|.csv|.parquet`,
or a hub id); the spec names how to read them. A row the spec cannot map raises one `DataError`
naming the spec and its field, the file and the row, and the fix.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

BUILTIN_DIR = Path(__file__).with_name("taskspecs")
ANSWER_TYPES = ("index", "label", "text")


class SpecError(ValueError):
    """A task spec file is malformed (unknown key, bad value): names the file and the key."""


@dataclass(frozen=True)
class TaskSpec:
    task: str
    """The spec's name."""
    question: str
    """Field path or template giving the question text."""
    choices: Any
    """Field path or template giving the list of choice texts, or a list of paths/templates, one per choice."""
    answer: str
    """Field path or template giving the answer, read as `answer_type` says."""
    answer_type: str = "index"
    """'index' (0-based int, or a string of one), 'label' (one of `labels`), 'text' (one of the choices)."""
    labels: Optional[str] = None
    """answer_type 'label': field path or template giving the row's labels; null: A, B, C, ... ."""
    id: Optional[str] = None
    """Field path or template giving a unique id; null: '<task>/<split>/<row number>'."""
    subject: Optional[str] = None
    """Field path or template giving the subject (MMLU's 57); null: none."""
    filter: Optional[str] = None
    """Template; a row is kept when it renders 'True'."""
    description: str = ""
    dataset_path: Optional[str] = None
    """The canonical source: a hub id, or a local folder. `data.source` says where the rows are read from."""
    dataset_name: Optional[str] = None
    """Hub config, e.g. 'ARC-Easy' (`data.hub_config` overrides it)."""
    revision: Optional[str] = None
    """Hub revision (a commit, tag or branch)."""
    training_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    path: str = field(default="", compare=False)
    """The YAML file it was read from."""

    @property
    def splits(self) -> tuple[str, str, str]:
        return self.training_split, self.validation_split, self.test_split

    @property
    def is_shared_schema(self) -> bool:
        """Rows already in the shared schema: they are read as they are and checked strictly."""
        return (self.id, self.question, self.choices, self.answer, self.answer_type) == (
            "id", "question", "choices", "answer", "index") and self.filter is None


def builtin_specs() -> dict[str, Path]:
    """{name: YAML file} of the specs shipped in engine/taskspecs/."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_spec(name_or_path: str) -> TaskSpec:
    """A built-in spec by name, or a spec YAML file by path. Unknown keys and bad values are SpecErrors."""
    builtin = builtin_specs()
    path = builtin.get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise SpecError(f"data.task: {name_or_path!r} is neither a built-in task spec ({', '.join(builtin)}) nor a "
                        "YAML file; run `distill tasks` to list the built-in ones, or give the path of your spec")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a task spec is a mapping of keys (task, question, choices, answer, ...)")
    known = {f.name for f in fields(TaskSpec)} - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r}; a spec's keys are {', '.join(sorted(known))}")
    for key in ("task", "question", "choices", "answer"):
        if not raw.get(key):
            raise SpecError(f"{path}: key {key!r} is missing; every spec says how a row gives its {key}")
    if raw.get("answer_type", "index") not in ANSWER_TYPES:
        raise SpecError(f"{path}: answer_type: must be one of {ANSWER_TYPES}, got {raw['answer_type']!r}")
    for key, value in raw.items():
        if key == "choices":
            ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            if not ok:
                raise SpecError(f"{path}: choices: give a field path, a template, or a list of them")
        elif value is not None and not isinstance(value, str):
            raise SpecError(f"{path}: {key}: must be a string, got {value!r}")
    return TaskSpec(**raw, path=str(path))


# ---------------------------------------------------------------------------------------------
# Mapping one row


class RowError(ValueError):
    """A row the spec cannot map: `key` is the spec's field, the message what went wrong."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


_TOKEN = re.compile(r"\[\d*\]|[^.\[\]]+")
_PATH = re.compile(r"[^.\[\]]+(\.[^.\[\]]+|\[\d*\])*")


def resolve(row: Any, path: str) -> Any:
    """The value at a field path: 'question.stem', 'question.choices[].text', 'options[0]'."""
    if not _PATH.fullmatch(path):
        raise KeyError(f"{path!r} is not a field path (write a.b, a[].b or a[0])")
    tokens = _TOKEN.findall(path)

    def walk(obj: Any, i: int, so_far: str) -> Any:
        if i == len(tokens):
            return obj
        tok = tokens[i]
        if tok == "[]":
            if not isinstance(obj, (list, tuple)):
                raise KeyError(f"{so_far or 'the row'} is {type(obj).__name__}, not a list")
            return [walk(x, i + 1, f"{so_far}[{j}]") for j, x in enumerate(obj)]
        if tok.startswith("["):
            k = int(tok[1:-1])
            if not isinstance(obj, (list, tuple)) or k >= len(obj):
                raise KeyError(f"{so_far}{tok} is out of range")
            return walk(obj[k], i + 1, f"{so_far}{tok}")
        if not isinstance(obj, dict) or tok not in obj:
            where = f"{so_far}.{tok}" if so_far else tok
            raise KeyError(f"{where} is missing")
        return walk(obj[tok], i + 1, f"{so_far}.{tok}" if so_far else tok)

    return walk(row, 0, "")


@lru_cache(maxsize=1)
def _jinja():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
    env.filters["after"] = lambda s, sep: str(s).split(sep, 1)[1] if sep in str(s) else str(s)
    env.filters["strip"] = lambda s: str(s).strip()
    return env


@lru_cache(maxsize=256)
def _compile(template: str):
    return _jinja().from_string(template)


def value(row: dict, key: str, spec_value: str) -> Any:
    """What `spec_value` (a field path or a template) gives for this row; RowError naming `key` if it can't.
    Templates also see `split` and `row_number` (1-based) unless the row has fields of those names."""
    if is_template(spec_value):
        from jinja2 import TemplateError

        try:
            return _compile(spec_value).render(**{**row.get("__context__", {}), **row})
        except TemplateError as err:
            raise RowError(key, f"template {spec_value!r} failed: {err}") from None
    try:
        return resolve(row, spec_value)
    except KeyError as err:
        raise RowError(key, f"field path {spec_value!r}: {err.args[0]}") from None


def _text(row: dict, key: str, spec_value: str) -> str:
    out = value(row, key, spec_value)
    if not isinstance(out, (str, int, float)) or isinstance(out, bool):
        raise RowError(key, f"{spec_value!r} gives {type(out).__name__} {out!r}, not text")
    out = str(out)
    if not out.strip():
        raise RowError(key, f"{spec_value!r} renders empty")
    return out


def _list(row: dict, key: str, spec_value: Any) -> list:
    if isinstance(spec_value, list):
        return [_text(row, f"{key}[{i}]", v) for i, v in enumerate(spec_value)]
    out = value(row, key, spec_value)
    if isinstance(out, str) and is_template(spec_value):
        try:
            out = ast.literal_eval(out.strip())
        except (ValueError, SyntaxError):
            raise RowError(key, f"template {spec_value!r} must render a list literal like ['a', 'b'], got {out!r}") from None
    if not isinstance(out, (list, tuple)):
        raise RowError(key, f"{spec_value!r} gives {type(out).__name__} {out!r}, not a list")
    return list(out)


def map_row(spec: TaskSpec, row: dict, split: str, number: int) -> dict | None:
    """One source row in the shared schema ({id, question, choices, answer, subject}), or None when the
    spec's filter drops it. `number` is the row's 1-based position in its split. Raises RowError."""
    if not isinstance(row, dict):
        raise RowError("question", f"expected a mapping of fields, got {type(row).__name__}")
    row = {**row, "__context__": {"split": split, "row_number": number}}
    if spec.filter and value(row, "filter", spec.filter).strip() != "True":
        return None
    question = _text(row, "question", spec.question)
    choices = _list(row, "choices", spec.choices)
    if not choices:
        raise RowError("choices", f"{spec.choices!r} gives an empty list of choices")
    for i, c in enumerate(choices):
        if not isinstance(c, (str, int, float)) or not str(c).strip():
            raise RowError("choices", f"choice {i} is {c!r}, not a non-empty text")
    choices = [str(c) for c in choices]
    raw = value(row, "answer", spec.answer)
    answer = _answer(spec, row, raw, choices)
    subject = None
    if spec.subject:
        subject = str(value(row, "subject", spec.subject)).strip() or None
    return {"id": _text(row, "id", spec.id) if spec.id else f"{spec.task}/{split}/{number}", "question": question,
            "choices": choices, "answer": answer, "subject": subject}


def _answer(spec: TaskSpec, row: dict, raw: Any, choices: list[str]) -> int:
    if spec.answer_type == "index":
        # a field must hold an int; a template renders text, so its digits are read as one
        text = str(raw).strip()
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and is_template(spec.answer)
                                                                    and re.fullmatch(r"-?\d+", text))):
            raise RowError("answer", f"{spec.answer!r} gives {raw!r} ({type(raw).__name__}), not a 0-based int index")
        k = int(text)
        if not 0 <= k < len(choices):
            raise RowError("answer", f"index {k} is out of range for {len(choices)} choices")
        return k
    if spec.answer_type == "label":
        labels = [str(x).strip() for x in _list(row, "labels", spec.labels)] if spec.labels else \
            [chr(ord("A") + i) for i in range(len(choices))]
        if len(labels) != len(choices):
            raise RowError("labels", f"{len(labels)} labels for {len(choices)} choices")
        label = str(raw).strip()
        if label not in labels:
            raise RowError("answer", f"label {label!r} is not among the choices' labels {labels}")
        return labels.index(label)
    text = str(raw).strip()
    stripped = [c.strip() for c in choices]
    if text not in stripped:
        raise RowError("answer", f"answer text {text!r} is not one of the choices {stripped}")
    return stripped.index(text)
