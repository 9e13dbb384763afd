"""Student scoring heads: how a student turns its backbone's output into a score per choice. Each is
one entry in `HEADS`, and that entry is all the engine needs.

* 'head': a fresh linear layer on the pooled state of each row (any model), `Linear(hidden, 1)` per
  choice or `Linear(hidden, max_choices)` over the labels (the prompt mode's `head_width`).
* 'lm': a decoder's own LM head: the choice's log-likelihood, or the label token's log-prob (the
  prompt mode's `lm_scores`), so a causal LM stays a causal LM.

`student.scoring` names the head; the config checks the name against this table (and that only a
`fresh` head trains with finetune='head'), `engine.student` loads, builds, scores and freezes through the
entry, and `engine.student_folder` saves a fresh head apart. `tests/test_modes.py` adds a head in a
test. torch is imported only when a head is built, so reading a config stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from engine.modes import prompt_mode


@dataclass(frozen=True)
class ScoringHead:
    name: str
    """What `student.scoring` calls it."""
    doc: str
    """One line for the docs: what scores."""
    loads: str
    """The transformers class the backbone is loaded with: 'AutoModel' (no LM head) or
    'AutoModelForCausalLM'."""
    kinds: tuple[str, ...]
    """The model kinds it can score with (`engine.student.model_kind`: 'encoder', 'decoder')."""
    build: Callable[[Any, Optional[np.ndarray]], None]
    """(StudentModel, label token ids or None) -> None: give the new model its scoring parts: `model.head`
    (a fresh module, or None) and any buffers. Raise ValueError if the mode needs something missing."""
    scores: Callable[[Any, Any], Any]
    """(StudentModel, Batch) -> the batch's row scores, in the layout the prompt mode's
    `question_logits` takes."""
    top_parameters: Callable[[Any], Iterable]
    """StudentModel -> the parameters that train with the top blocks under finetune='top', besides them."""
    fresh: bool = False
    """A fresh module on the pooled state (`model.head`): saved apart as head.safetensors, and the only
    kind finetune='head' can train (on the frozen backbone's cached features)."""
    lm_head: bool = False
    """Scores with the backbone's own LM head: tied LM-head weights are not missing, and in a mode with
    letter labels it scores their tokens (so the student needs them)."""
    needs: str = ""
    """Why it needs `kinds`, for the error on another kind of model."""


def _build_fresh(model, letter_ids: Optional[np.ndarray]) -> None:
    from torch import nn

    hidden = int(model.backbone.config.hidden_size)
    model.head = nn.Linear(hidden, prompt_mode(model.mode).head_width(model.max_choices))
    nn.init.normal_(model.head.weight, std=0.02)
    nn.init.zeros_(model.head.bias)


def _fresh_scores(model, batch):
    state = batch.features if batch.features is not None else model.pool(
        batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.last_index)
    return model.head(state)


def _build_lm(model, letter_ids: Optional[np.ndarray]) -> None:
    import torch

    if prompt_mode(model.mode).has_letter_labels and (letter_ids is None or len(letter_ids) < model.max_choices):
        raise ValueError(f"{model.mode} mode with scoring='lm' needs a label token per choice")
    ids = np.zeros(0, np.int64) if letter_ids is None else np.asarray(letter_ids, np.int64)
    model.register_buffer("letter_ids", torch.from_numpy(ids), persistent=False)
    model.head = None


def _lm_scores(model, batch):
    logits = model.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return prompt_mode(model.mode).lm_scores(logits, batch, model.letter_ids[: model.max_choices])


HEADS: dict[str, ScoringHead] = {h.name: h for h in (
    ScoringHead("head", "a fresh linear head on the pooled state (any model)", "AutoModel", ("encoder", "decoder"),
                _build_fresh, _fresh_scores, lambda model: model.head.parameters(), fresh=True),
    ScoringHead("lm", "the decoder's own LM head: the choice's log-likelihood or the label token's log-prob",
                "AutoModelForCausalLM", ("decoder",), _build_lm, _lm_scores,
                lambda model: model.backbone.get_output_embeddings().parameters(), lm_head=True,
                needs="scores with a causal LM head"),
)}
"""Every scoring head, by name."""


def scoring_head(name: str) -> ScoringHead:
    """The scoring head called `name`, or a ValueError listing the known ones."""
    if name not in HEADS:
        raise ValueError(f"student.scoring must be one of {tuple(HEADS)}, got {name!r}")
    return HEADS[name]
