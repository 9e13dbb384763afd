"""Token sequences for teacher and student: one row per question (letter) or per choice (per-choice).

Rows are what the activation store indexes; the prompt mode (`engine.modes`) decides what they hold.
In letter mode row q is question q and the state is read at its last token: 'Answer:', then any
tokens all labels share (the '(' of '(A)'). In per-choice mode the rows of a question are its choices
in order, and each row's continuation (the choice text) starts at `start[r]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ConfigError, PromptConfig
from engine.modes import prompt_mode
from engine.prompts import answer_texts, chat_wrap, draw_shots
from engine.tasks import Example


@dataclass
class Sequences:
    mode: str
    ids: list[np.ndarray]
    """Token ids of each row."""
    start: np.ndarray
    """(R,) index of the first scored token of each row: the choice text, or len(ids) in letter mode."""
    row_question: np.ndarray
    """(R,) question index of each row."""
    row_choice: np.ndarray
    """(R,) choice index of each row (0 in letter mode)."""
    n_choices: np.ndarray
    """(Q,) choices per question."""
    answer: np.ndarray
    """(Q,) gold answer index per question."""
    letter_ids: np.ndarray
    """(C_max,) token id of each choice label in letter mode; empty in per-choice mode."""
    type_ids: list[np.ndarray] | None = None
    """Token type (segment) ids of each row, for encoders that read a text pair; None elsewhere."""

    @property
    def n_rows(self) -> int:
        return len(self.row_question)

    @property
    def n_questions(self) -> int:
        return len(self.answer)

    @property
    def max_choices(self) -> int:
        return int(self.n_choices.max()) if len(self.n_choices) else 0

    @property
    def score_width(self) -> int:
        """Teacher scores per row: label log-probs (letter) or [log-likelihood, tokens] (per-choice)."""
        return prompt_mode(self.mode).score_width(self)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def rows_view(self, lo: int, hi: int) -> Sequences:
        """Rows lo:hi with question-level arrays kept whole: the unit of work of an extraction chunk."""
        return Sequences(
            mode=self.mode,
            ids=self.ids[lo:hi],
            start=self.start[lo:hi],
            row_question=self.row_question[lo:hi],
            row_choice=self.row_choice[lo:hi],
            n_choices=self.n_choices,
            answer=self.answer,
            letter_ids=self.letter_ids,
            type_ids=None if self.type_ids is None else self.type_ids[lo:hi],
        )

    def select(self, questions: np.ndarray) -> Sequences:
        """The rows of the given questions, renumbered 0..len(questions)-1."""
        questions = np.asarray(questions, dtype=np.int64)
        remap = np.full(self.n_questions, -1, dtype=np.int64)
        remap[questions] = np.arange(len(questions))
        rows = np.flatnonzero(remap[self.row_question] >= 0)
        rows = rows[np.argsort(remap[self.row_question[rows]], kind="stable")]
        return Sequences(
            mode=self.mode,
            ids=[self.ids[r] for r in rows],
            start=self.start[rows],
            row_question=remap[self.row_question[rows]],
            row_choice=self.row_choice[rows],
            n_choices=self.n_choices[questions],
            answer=self.answer[questions],
            letter_ids=self.letter_ids,
            type_ids=None if self.type_ids is None else [self.type_ids[r] for r in rows],
        )


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def label_tokens(tokenizer, n: int, answer_format: str) -> tuple[list[int], np.ndarray]:
    """How the n labels are told apart after 'Answer:': (shared, letter_ids).

    `shared` is the labels' common leading tokens (e.g. '(' for '({letter})'), which the prompt then
    ends with; `letter_ids` is each label's next token, where they must differ (the scored token).
    """
    labels = [_encode(tokenizer, t, False) for t in answer_texts(n, answer_format)]
    m = 0
    while all(len(x) > m for x in labels) and len({x[m] for x in labels}) == 1:
        m += 1
    ids = [x[m] if len(x) > m else -1 for x in labels]
    if len(set(ids)) != len(ids) or -1 in ids:
        raise ConfigError(
            f"prompt.answer_format: {answer_format!r} gives labels that no single token tells apart "
            f"({labels}); pick a format whose labels tokenize apart, e.g. ' {{letter}}'"
        )
    return labels[0][:m], np.asarray(ids, dtype=np.int64)


def shots_text(shots: list[Example], mode: str, answer_format: str, template: str | None = None) -> str:
    """The solved examples, each followed by a blank line: 'Question: ...\nAnswer: <gold choice>' (per-choice)
    or the letter prompt and its gold label (letter): the mode's `solved_text`."""
    solved = prompt_mode(mode).solved_text
    return "".join(solved(s, answer_format, template) + "\n\n" for s in shots)


def prompt_prefix(ex: Example, tokenizer, prompt: PromptConfig, fewshot_pool: list[Example] | None) -> tuple[str, bool]:
    """(the text before the scored part, whether the tokenizer should add its special tokens): few-shot
    examples and the question, wrapped in the chat template if asked (which brings its own)."""
    try:
        first = prompt_mode(prompt.mode).question_text(ex, prompt)
    except ValueError as err:
        raise ConfigError(f"prompt.template: {err}") from None
    if prompt.fewshot:
        if fewshot_pool is None:
            raise ConfigError("prompt.fewshot: no few-shot pool was loaded; pass the prompt.fewshot_split rows")
        try:
            shots = draw_shots(ex, fewshot_pool, prompt.fewshot, prompt.fewshot_seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        first = shots_text(shots, prompt.mode, prompt.answer_format, prompt.template) + first
    if prompt.chat_template:
        try:
            return chat_wrap(tokenizer, first), False
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return first, True


def build_sequences(examples: list[Example], tokenizer, prompt: PromptConfig,
                    fewshot_pool: list[Example] | None = None) -> Sequences:
    """Tokenize every question once. Over-long prompts lose tokens from the left of the prefix.
    `fewshot_pool`: the rows of `prompt.fewshot_split` (needed when `prompt.fewshot` > 0)."""
    mode = prompt_mode(prompt.mode)
    ids: list[np.ndarray] = []
    start, row_q, row_c = [], [], []
    n_choices = np.asarray([len(ex.choices) for ex in examples], dtype=np.int64)
    shared, letters = [], np.zeros(0, dtype=np.int64)
    if mode.has_letter_labels and len(examples):
        shared, letters = label_tokens(tokenizer, int(n_choices.max()), prompt.answer_format)

    def encode(text: str, special: bool) -> list[int]:
        return _encode(tokenizer, text, special)

    for q, ex in enumerate(examples):
        prefix_text, special = prompt_prefix(ex, tokenizer, prompt, fewshot_pool)
        for c, (row, first) in enumerate(mode.token_rows(ex, prefix_text, special, encode, shared, prompt)):
            ids.append(np.asarray(row, dtype=np.int64))
            start.append(first)
            row_q.append(q)
            row_c.append(c)
    return Sequences(
        mode=prompt.mode,
        ids=ids,
        start=np.asarray(start, dtype=np.int64),
        row_question=np.asarray(row_q, dtype=np.int64),
        row_choice=np.asarray(row_c, dtype=np.int64),
        n_choices=n_choices,
        answer=np.asarray([ex.answer for ex in examples], dtype=np.int64),
        letter_ids=letters,
    )
