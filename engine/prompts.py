"""Prompt rendering for the two ways of reading a multiple-choice question (`engine.modes`).

Letter mode lists the choices with labels and ends at "Answer:"; the answer is the label's first
token. Per-choice mode gives one (prefix, continuation) pair per choice; the continuation is scored.
Few-shot examples go before the question as solved questions in the same format, a blank line apart
(lm-eval's `fewshot_delimiter`, `engine.sequences.shots_text`); a chat template, when asked for, wraps
everything but the continuation.
"""

from __future__ import annotations

import string
import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.tasks import Example

LETTERS = string.ascii_uppercase


def choice_label(i: int, answer_format: str) -> str:
    """The label of choice i under a format: ' {letter}' -> ' A', '({letter})' -> '(A)', '{number}.' -> '1.'."""
    return answer_format.format(letter=LETTERS[i], number=i + 1)


def _listing_label(i: int, answer_format: str) -> str:
    label = choice_label(i, answer_format).strip()
    return label if not label.isalnum() else label + "."


def render(template: str, ex: Example, answer_format: str = " {letter}") -> str:
    """A prompt template (Jinja, sandboxed) for one question. Variables: question (stripped), choices,
    labels (each choice's label under `answer_format`, e.g. 'A'), subject. Raises ValueError."""
    from jinja2 import TemplateError

    from engine.taskspec import _compile

    labels = [choice_label(i, answer_format).strip() for i in range(len(ex.choices))]
    try:
        text = _compile(template).render(question=ex.question.strip(), choices=list(ex.choices), labels=labels,
                                         subject=ex.subject)
    except TemplateError as err:
        raise ValueError(f"template {template!r} failed on question {ex.id!r}: {err}") from None
    if not text.strip():
        raise ValueError(f"template {template!r} renders empty for question {ex.id!r}")
    return text


def letter_prompt(ex: Example, answer_format: str, template: str | None = None) -> str:
    """Question, labelled choices, and 'Answer:'. The model's next token should be the label.
    `template`: the whole text instead (it must end where the label is scored)."""
    if template:
        return render(template, ex, answer_format)
    lines = [f"Question: {ex.question.strip()}"]
    lines += [f"{_listing_label(i, answer_format)} {c.strip()}" for i, c in enumerate(ex.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def answer_texts(n_choices: int, answer_format: str) -> list[str]:
    """What follows 'Answer:' for each choice in letter mode: the label as written by the format."""
    return [choice_label(i, answer_format) for i in range(n_choices)]


def per_choice_texts(ex: Example, template: str | None = None) -> tuple[str, list[str]]:
    """The shared prefix and one continuation per choice, as lm-eval-harness does for ARC. `template`:
    the prefix instead (default 'Question: {{ question }}\nAnswer:')."""
    prefix = render(template, ex) if template else f"Question: {ex.question.strip()}\nAnswer:"
    return prefix, [" " + c.strip() for c in ex.choices]


def draw_shots(ex: Example, pool: list[Example], k: int, seed: int) -> list[Example]:
    """k solved examples for `ex` from `pool`, seeded by `seed` and the question's id; never `ex` itself
    (neither its id nor its question text)."""
    if k <= 0:
        return []
    candidates = [p for p in pool if p.id != ex.id and p.question.strip() != ex.question.strip()]
    if len(candidates) < k:
        raise ValueError(f"prompt.fewshot: {k} examples asked, but the few-shot split holds only {len(candidates)} "
                         "other questions; lower prompt.fewshot or pick a larger prompt.fewshot_split")
    rng = np.random.default_rng([seed, zlib.crc32(ex.id.encode())])
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


def chat_wrap(tokenizer, text: str) -> str:
    """`text` as one user turn of the tokenizer's chat template, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt.chat_template: the teacher's tokenizer has no chat template; set it false")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
