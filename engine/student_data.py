"""What a student reads: its own token rows built from the questions' text, and batches of whole questions.

`encode_examples` tokenizes questions with the student's own tokenizer (`InputSpec`: encoder or decoder,
per-choice or letter, the length cap): an encoder reads (question, choice) text pairs with segment ids,
a decoder what the teacher reads. `make_batches` groups whole questions (all rows of a question
together), right-padded, or, for the head regime, their rows' cached pooled features (and, for the
top-block regime, the cached states of the frozen bottom blocks beside the tokens: `TokenStates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from engine.modes import prompt_mode
from engine.sequences import Sequences, build_sequences, label_tokens
from engine.tasks import Example

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
    template: Optional[str] = None
    """`student.template`: the student's own input template (null: the question, or the teacher's prompt)."""

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "mode": self.mode, "max_length": self.max_length, "answer_format": self.answer_format}
        return d | ({"template": self.template} if self.template else {})  # absent when null: older fingerprints hold


def encode_examples(examples: Sequence[Example], tokenizer, spec: InputSpec) -> Sequences:
    """Token rows of the questions in the student's own vocabulary (one per choice, or one per question).

    Encoders read what the mode's `encoder_texts` gives: (question, choice) text pairs with segment ids,
    or the letter prompt; decoders read
    what the teacher reads (`build_sequences`), so `start` marks each choice's first token and
    `letter_ids` the label tokens. Over-long inputs lose tokens from the left of the question.
    """
    from engine.config import ConfigError, PromptConfig
    from engine.prompts import render

    if spec.kind == "decoder":
        prompt = PromptConfig(mode=spec.mode, answer_format=spec.answer_format, max_length=spec.max_length,
                              template=spec.template)
        try:
            return build_sequences(list(examples), tokenizer, prompt)
        except ConfigError as err:
            raise ConfigError(str(err).replace("prompt.template", "student.template")) from None

    def first_text(ex: Example) -> str:
        if not spec.template:
            return ex.question.strip()
        try:
            return render(spec.template, ex, spec.answer_format)
        except ValueError as err:
            raise ConfigError(f"student.template: {err}") from None

    n_choices = np.asarray([len(ex.choices) for ex in examples], dtype=np.int64)
    answer = np.asarray([ex.answer for ex in examples], dtype=np.int64)
    firsts, seconds, row_q, row_c = prompt_mode(spec.mode).encoder_texts(examples, first_text, spec)
    if seconds is None:
        with _truncating_left(tokenizer):
            enc = tokenizer(firsts, truncation=True, max_length=spec.max_length) if firsts else {"input_ids": []}
    else:
        enc = _encode_pairs(tokenizer, firsts, seconds, spec.max_length) if firsts else {"input_ids": []}
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
    states: Optional[torch.Tensor] = None
    """(R, L, H) what the frozen bottom blocks output at each token (finetune='top'), beside the tokens:
    the blocks that train start from them (`engine.student.skip_bottom`)."""

    @property
    def size(self) -> int:
        return len(self.questions)

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


@dataclass
class TokenStates:
    """Per-token states of every row of a split, rows in `Sequences` order and concatenated: row r's
    tokens are `flat[offsets[r]:offsets[r + 1]]`. Under finetune='top' these are the frozen bottom
    blocks' output (`engine.student.bottom_states`), computed once per split."""

    flat: np.ndarray
    """(T, H) float32, T = the split's real tokens."""
    offsets: np.ndarray
    """(R + 1,) where each row's tokens start, then T."""

    @classmethod
    def of(cls, seqs: Sequences, flat: np.ndarray) -> TokenStates:
        offsets = np.concatenate([[0], np.cumsum(seqs.lengths())]).astype(np.int64)
        if flat.ndim != 2 or flat.shape[0] != offsets[-1]:
            raise ValueError(f"token states of shape {flat.shape} do not fit a split of {offsets[-1]} tokens")
        return cls(flat, offsets)

    def padded(self, rows: np.ndarray, width: int) -> torch.Tensor:
        """(len(rows), width, H) float32, right-padded with zeros like the rows' tokens."""
        out = np.zeros((len(rows), width, self.flat.shape[1]), dtype=np.float32)
        for i, r in enumerate(rows):
            a, z = self.offsets[r], self.offsets[r + 1]
            out[i, : z - a] = self.flat[a:z]
        return torch.from_numpy(out)


def question_rows(seqs: Sequences) -> list[np.ndarray]:
    """Row indices of each question, in choice order."""
    order = np.lexsort((seqs.row_choice, seqs.row_question))
    bounds = np.searchsorted(seqs.row_question[order], np.arange(seqs.n_questions + 1))
    return [order[bounds[q] : bounds[q + 1]] for q in range(seqs.n_questions)]


def collate(seqs: Sequences, questions: Sequence[int], *, rows_of: list[np.ndarray], targets: Optional[np.ndarray],
            pad_id: int, gold: Optional[np.ndarray] = None, features: Optional[np.ndarray | TokenStates] = None) -> Batch:
    """One batch of whole questions, right-padded (or, with pooled `features`, their rows' pooled states;
    with `TokenStates`, the tokens and the bottom blocks' states at each)."""
    questions = np.asarray(questions, dtype=np.int64)
    rows = np.concatenate([rows_of[q] for q in questions])
    local_q = np.concatenate([np.full(len(rows_of[q]), i, dtype=np.int64) for i, q in enumerate(questions)])
    lengths = np.asarray([len(seqs.ids[r]) for r in rows], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("a row has no tokens")
    ids = mask = types = feats = states = None
    if features is not None and not isinstance(features, TokenStates):
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
        if features is not None:
            states = features.padded(rows, L)
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
        states=states,
    )


def make_batches(seqs: Sequences, targets: Optional[np.ndarray], questions: np.ndarray, batch_size: int, pad_id: int,
                 *, rng: Optional[np.random.Generator] = None, bucket: int = 50, gold: Optional[np.ndarray] = None,
                 features: Optional[np.ndarray | TokenStates] = None) -> list[Batch]:
    """Batches of `batch_size` whole questions, drawn from `questions`.

    With `rng`: shuffle, then sort by length within windows of `bucket` batches (so padding stays
    small), then shuffle the batch order. Without: sorted by length (for prediction). `targets` and
    `gold` cover every question of `seqs`; `features` (pooled, or `TokenStates`) every row.
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
