"""Prompt rendering for the two ways of reading a multiple-choice question.

Letter mode lists the choices with labels and ends at "Answer:"; the answer is the label's first
token. Per-choice mode gives one (prefix, continuation) pair per choice; the continuation is scored.
"""

from __future__ import annotations

import string

from engine.tasks import Example

LETTERS = string.ascii_uppercase


def choice_label(i: int, answer_format: str) -> str:
    """The label of choice i under a format: ' {letter}' -> ' A', '({letter})' -> '(A)', '{number}.' -> '1.'."""
    return answer_format.format(letter=LETTERS[i], number=i + 1)


def _listing_label(i: int, answer_format: str) -> str:
    label = choice_label(i, answer_format).strip()
    return label if not label.isalnum() else label + "."


def letter_prompt(ex: Example, answer_format: str) -> str:
    """Question, labelled choices, and 'Answer:'. The model's next token should be the label."""
    lines = [f"Question: {ex.question.strip()}"]
    lines += [f"{_listing_label(i, answer_format)} {c.strip()}" for i, c in enumerate(ex.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def answer_texts(n_choices: int, answer_format: str) -> list[str]:
    """What follows 'Answer:' for each choice in letter mode: the label as written by the format."""
    return [choice_label(i, answer_format) for i in range(n_choices)]


def per_choice_texts(ex: Example) -> tuple[str, list[str]]:
    """The shared prefix and one continuation per choice, as lm-eval-harness does for ARC."""
    return f"Question: {ex.question.strip()}\nAnswer:", [" " + c.strip() for c in ex.choices]
