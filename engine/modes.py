"""Prompt modes: the ways a multiple-choice question is put to the teacher, read by a probe and by a
student. Each mode is one entry in `MODES`, and that entry is all the engine needs.

* 'letter': the question with its labelled choices, one row per question, ending where the label
  follows 'Answer:'. The teacher's scores are the label tokens' log-probs there, a probe classifies
  the row over the labels, a student reads the listing and scores each label.
* 'per_choice': one row per choice, the question as a shared prefix and the choice text as the scored
  continuation (lm-eval's way). The teacher's score is the continuation's log-likelihood, a probe
  scores each row and softmaxes within the question, a student scores each (question, choice).

A mode is a `PromptMode` subclass: its flags say which shared machinery applies, and its methods do
what differs, each documented on `PromptMode`. The readers: `engine.sequences` (the teacher's rows),
`engine.teacher` (the forward's scores), `engine.probes` (targets and readout), `engine.student_data`
and `engine.student` (the student's inputs and logits), the config's checks (`prompt.mode`,
`student.mode`), the vLLM baseline and the report. `tests/test_modes.py` adds a mode in a test.
torch is imported only by the methods that run a model, so reading a config stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.metrics import softmax_rows
from engine.prompts import choice_label, letter_prompt, per_choice_texts

if TYPE_CHECKING:
    import torch

    from engine.config import PromptConfig
    from engine.sequences import Sequences
    from engine.student_data import Batch, InputSpec
    from engine.tasks import Example

Encode = Callable[[str, bool], list[int]]
"""(text, add special tokens) -> token ids, with the teacher's tokenizer."""
Row = tuple[list[int], int]
"""One token row: its ids and the index of its first scored token (`Sequences.start`)."""


class PromptMode:
    """One prompt mode: what `prompt.mode` and `student.mode` name. Subclass it, set the flags, implement
    every method, and add an instance to `MODES`."""

    name: str = ""
    """What `prompt.mode` and `student.mode` call it."""
    doc: str = ""
    """One line for the docs."""
    has_letter_labels: bool = False
    """Rows end where the answer labels follow, and the labels' tokens (`Sequences.letter_ids`, from
    `engine.sequences.label_tokens`) are what is scored there. Everything that reads label tokens follows
    it: the teacher's rows get them, the vLLM baseline asks for their next-token log-probs, an LM-head
    student scores them, a student can score at most as many choices as it has labels, and the
    brittleness table (letter prompts under other answer formats) can score this mode's probe."""
    row_per_choice: bool = False
    """A question's rows are its choices, in order, each a shared prefix and its own scored continuation:
    the teacher packs a question's rows over one copy of the prefix, `prompt.pool='mean'` averages a
    row's continuation, and grouped probe families (`engine.families`) fit within a question's rows."""
    normalisable: bool = False
    """The teacher's score is a continuation's log-likelihood, so `prompt.normalise` may divide it by
    tokens or bytes, and the report gives all three accuracies."""
    score_fill: float = 0.0
    """What the teacher's score matrix holds where a row has no score."""

    # --- the teacher's prompt rows (engine.sequences)

    def question_text(self, ex: Example, prompt: PromptConfig) -> str:
        """The question's text before the scored part, `prompt.template` applied (ValueError if it fails)."""
        raise NotImplementedError

    def solved_text(self, ex: Example, answer_format: str, template: str | None) -> str:
        """A few-shot example: the question as `question_text` writes it, followed by its gold answer."""
        raise NotImplementedError

    def token_rows(self, ex: Example, prefix_text: str, special: bool, encode: Encode, shared: list[int],
                   prompt: PromptConfig) -> list[Row]:
        """The question's rows, in choice order (one row is choice 0): `prefix_text` (few-shot examples and
        `question_text`, maybe chat-wrapped; `special`: whether the tokenizer adds its special tokens),
        then the scored part, cut from the left to `prompt.max_length`. `shared`: the labels' common
        leading tokens (`has_letter_labels`), else empty."""
        raise NotImplementedError

    def score_width(self, seqs: Sequences) -> int:
        """Teacher scores stored per row."""
        raise NotImplementedError

    # --- the teacher's forward (engine.teacher)

    def scored_positions(self, tokens: np.ndarray, prefix_len: int, a: int, z: int) -> tuple[list[int], list[int]]:
        """For one row of a packed sequence `tokens` (its shared prefix is `prefix_len` long, the row's own
        tokens are tokens[a:z]): the positions whose next-token distribution its score reads, and the
        tokens scored there (none when `fill_scores` reads the label tokens instead)."""
        raise NotImplementedError

    def fill_scores(self, seqs: Sequences, rows: np.ndarray, slots: list[int], logp: torch.Tensor,
                    tokens: list[int], owner: list[int], out: np.ndarray) -> None:
        """Write a batch's teacher scores into `out` (one row per entry of `rows`). `logp`: the vocabulary
        log-probs at every position `scored_positions` gave, in order; `tokens` the tokens it gave;
        `owner` each position's index into `slots`, the batch rows' places in `out`."""
        raise NotImplementedError

    def choice_logprobs(self, seqs: Sequences, scores: np.ndarray, normalise: str,
                        chars: np.ndarray | None) -> np.ndarray:
        """(Q, C_max) the teacher's log-score per choice (-inf where absent) from stored row scores;
        `normalise` and `chars` as in `engine.teacher.teacher_choice_logprobs`."""
        raise NotImplementedError

    def baseline_logprobs(self, seqs: Sequences, scores: np.ndarray) -> np.ndarray:
        """(Q, C) the teacher's log-score per choice from the vLLM baseline's scores
        (`cluster.baseline.ScoreResult.scores`), unnormalised."""
        raise NotImplementedError

    # --- probes (engine.probes)

    def probe_targets(self, seqs: Sequences, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) int64: what a probe learns to predict from each row's state."""
        raise NotImplementedError

    def probe_probs(self, probe: Any, X: np.ndarray, seqs: Sequences, rows: np.ndarray, pos: np.ndarray,
                    present: np.ndarray) -> np.ndarray:
        """(Q_sel, C_max) choice probabilities from a fitted probe: `X` holds the states of `rows`, `pos`
        each row's question among the selected ones, `present` (Q_sel, C_max) marks their choices.
        Probabilities sum to 1 over present choices and are 0 elsewhere."""
        raise NotImplementedError

    # --- the student (engine.student_data, engine.student)

    def encoder_texts(self, examples: Sequence[Example], first_text: Callable[[Example], str],
                      spec: InputSpec) -> tuple[list[str], list[str] | None, np.ndarray, np.ndarray]:
        """What an encoder student reads: (first texts, second texts of text pairs or None, row_question,
        row_choice), one entry per row. `first_text(ex)`: `student.template` rendered, or the question."""
        raise NotImplementedError

    def head_width(self, max_choices: int) -> int:
        """Outputs of a fresh linear head per row."""
        raise NotImplementedError

    def lm_scores(self, logits: torch.Tensor, batch: Batch, letter_ids: torch.Tensor) -> torch.Tensor:
        """Row scores from a causal LM's logits (R, L, V) over the batch's rows, in the layout
        `question_logits` takes; `letter_ids` the label tokens (`has_letter_labels`)."""
        raise NotImplementedError

    def question_logits(self, scores: torch.Tensor, batch: Batch, width: int, max_choices: int) -> torch.Tensor:
        """(B, width) logits of the batch's questions from its row `scores` (a head's outputs, `head_width`
        per row, or `lm_scores`). Absent choices may hold anything: the caller masks them."""
        raise NotImplementedError


class Letter(PromptMode):
    name = "letter"
    doc = "the choices listed with labels, one row per question; the label after 'Answer:' is scored"
    has_letter_labels = True
    score_fill = -np.inf

    def question_text(self, ex, prompt):
        return letter_prompt(ex, prompt.answer_format, prompt.template)

    def solved_text(self, ex, answer_format, template):
        return letter_prompt(ex, answer_format, template) + choice_label(ex.answer, answer_format)

    def token_rows(self, ex, prefix_text, special, encode, shared, prompt):
        seq = (encode(prefix_text, special) + shared)[-prompt.max_length :]
        return [(seq, len(seq))]

    def score_width(self, seqs):
        return seqs.max_choices

    def scored_positions(self, tokens, prefix_len, a, z):
        return [a - 1], []

    def fill_scores(self, seqs, rows, slots, logp, tokens, owner, out):
        import torch

        lp = logp[:, torch.tensor(seqs.letter_ids)].numpy()  # (a copy: arrays from Ray are read-only)
        for j, slot in enumerate(slots):
            k = int(seqs.n_choices[seqs.row_question[rows[slot]]])
            out[slot, :k] = lp[j, :k]

    def choice_logprobs(self, seqs, scores, normalise, chars):
        return scores[:, : seqs.max_choices].astype(np.float64)

    def baseline_logprobs(self, seqs, scores):
        return scores

    def probe_targets(self, seqs, rows):
        return seqs.answer[seqs.row_question[rows]].astype(np.int64)

    def probe_probs(self, probe, X, seqs, rows, pos, present):
        """Multinomial over the labels: `classes_` mapped to their choice columns (a fold may lack some),
        then renormalised over the question's present choices (uniform if none has mass)."""
        out = np.zeros(present.shape)
        if len(rows):
            proba = probe.predict_proba(X)
            cols = np.asarray(probe.classes_, dtype=np.int64)
            keep = cols < present.shape[1]
            out[np.ix_(pos, cols[keep])] = proba[:, keep]
        out = np.where(present, out, 0.0)
        s = out.sum(axis=1, keepdims=True)
        uniform = present / np.maximum(present.sum(axis=1, keepdims=True), 1)
        return np.where(s > 0, out / np.where(s > 0, s, 1.0), uniform)

    def encoder_texts(self, examples, first_text, spec):
        firsts = [first_text(ex) if spec.template else letter_prompt(ex, spec.answer_format) for ex in examples]
        return firsts, None, np.arange(len(examples), dtype=np.int64), np.zeros(len(examples), dtype=np.int64)

    def head_width(self, max_choices):
        return max_choices

    def lm_scores(self, logits, batch, letter_ids):
        import torch

        last = logits[torch.arange(logits.shape[0], device=logits.device), batch.last_index]
        return torch.log_softmax(last.float(), -1)[:, letter_ids]

    def question_logits(self, scores, batch, width, max_choices):
        if width > max_choices:
            raise ValueError(f"a question has {width} choices but the student's letter head has {max_choices}")
        B = batch.n_choices.shape[0]
        return scores[:, :width].new_zeros(B, width).index_copy(0, batch.row_question, scores[:, :width])


class PerChoice(PromptMode):
    name = "per_choice"
    doc = "one row per choice: the question as prefix, the choice text as the scored continuation"
    row_per_choice = True
    normalisable = True

    def question_text(self, ex, prompt):
        return per_choice_texts(ex, prompt.template)[0]

    def solved_text(self, ex, answer_format, template):
        prefix, conts = per_choice_texts(ex, template)
        return prefix + conts[ex.answer]

    def token_rows(self, ex, prefix_text, special, encode, shared, prompt):
        conts = per_choice_texts(ex)[1]
        if prompt.chat_template:
            # The choice is the assistant's reply: no " " delimiter before it, and the template's trailing
            # whitespace (the newline after the generation prompt) starts every continuation, as lm-eval does.
            n = len(prefix_text) - len(prefix_text.rstrip())
            ws = prefix_text[len(prefix_text) - n:]
            prefix_text, conts = prefix_text[: len(prefix_text) - n], [ws + c.lstrip() for c in conts]
        prefix = encode(prefix_text, special)
        rows = []
        for cont_text in conts:
            cont = encode(cont_text, False)[: prompt.max_length - 1]
            keep = prefix[-(prompt.max_length - len(cont)) :]
            rows.append((keep + cont, len(keep)))
        return rows

    def score_width(self, seqs):
        return 2  # [sum of the continuation's log-probs, its token count]

    def scored_positions(self, tokens, prefix_len, a, z):
        return [prefix_len - 1] + list(range(a, z - 1)), tokens[a:z].tolist()

    def fill_scores(self, seqs, rows, slots, logp, tokens, owner, out):
        import torch

        ll = logp.gather(1, torch.as_tensor(tokens)[:, None])[:, 0].double()
        sums = torch.zeros(len(slots), dtype=torch.float64).index_add_(0, torch.as_tensor(owner), ll)
        out[slots, 0] = sums.numpy()
        out[slots, 1] = np.bincount(owner, minlength=len(slots))

    def choice_logprobs(self, seqs, scores, normalise, chars):
        out = np.full((seqs.n_questions, seqs.max_choices), -np.inf)
        ll = scores[:, 0].astype(np.float64)
        if normalise == "tokens":
            ll = ll / np.maximum(scores[:, 1], 1.0)
        elif normalise == "bytes":
            if chars is None:
                raise ValueError("normalise='bytes' needs the choices' lengths (choice_chars)")
            ll = ll / np.maximum(chars[seqs.row_question, seqs.row_choice], 1.0)
        elif normalise != "none":
            raise ValueError(f"normalise: must be 'none', 'tokens' or 'bytes', got {normalise!r}")
        out[seqs.row_question, seqs.row_choice] = ll
        return out

    def baseline_logprobs(self, seqs, scores):
        return self.choice_logprobs(seqs, np.stack([scores, seqs.lengths() - seqs.start], 1), "none", None)

    def probe_targets(self, seqs, rows):
        return (seqs.row_choice[rows] == seqs.answer[seqs.row_question[rows]]).astype(np.int64)

    def probe_probs(self, probe, X, seqs, rows, pos, present):
        """The softmax of the rows' `decision_function` within each question (a conditional-logit readout)."""
        logits = np.full(present.shape, -np.inf)
        if len(rows):
            logits[pos, seqs.row_choice[rows]] = probe.decision_function(X)
        return softmax_rows(np.where(present, logits, -np.inf))

    def encoder_texts(self, examples, first_text, spec):
        n_choices = np.asarray([len(ex.choices) for ex in examples], dtype=np.int64)
        firsts = [text for ex in examples for text in [first_text(ex)] * len(ex.choices)]
        seconds = [c.strip() for ex in examples for c in ex.choices]
        row_q = np.repeat(np.arange(len(examples), dtype=np.int64), n_choices)
        row_c = np.concatenate([np.arange(n, dtype=np.int64) for n in n_choices]) if len(examples) else row_q
        return firsts, seconds, row_q, row_c

    def head_width(self, max_choices):
        return 1

    def lm_scores(self, logits, batch, letter_ids):
        import torch

        input_ids = batch.input_ids
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :]
        scored = (pos >= batch.start[:, None]) & (pos <= batch.last_index[:, None])
        return (logp * scored).sum(1)

    def question_logits(self, scores, batch, width, max_choices):
        import torch

        B = batch.n_choices.shape[0]
        flat = torch.full((B * width,), float("-inf"), dtype=scores.dtype, device=scores.device)
        return flat.index_put((batch.row_question * width + batch.row_choice,), scores.reshape(-1)).view(B, width)


MODES: dict[str, PromptMode] = {m.name: m for m in (Letter(), PerChoice())}
"""Every prompt mode, by name."""


def prompt_mode(name: str) -> PromptMode:
    """The prompt mode called `name`, or a ValueError listing the known ones."""
    if name not in MODES:
        raise ValueError(f"prompt mode must be one of {tuple(MODES)}, got {name!r}")
    return MODES[name]
