"""The teacher forward: hidden states of chosen layers plus the teacher's own scores, in one pass.

Letter mode: the state at the last prompt token ("Answer:"), and the log-probabilities of the choice
labels' tokens there. Per-choice mode: the state at the choice's last token (or the mean over the
choice's tokens), and the choice's log-likelihood (sum over its tokens) with its token count.
The vocabulary projection runs only at the positions whose scores are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.sequences import Sequences


@dataclass
class ForwardOut:
    states: np.ndarray
    """(rows, layers, hidden) float16."""
    scores: np.ndarray
    """(rows, S) float32: letter log-probs (S = C_max, -inf beyond a question's choices) in letter
    mode; [sum log-prob of the choice, number of choice tokens] in per-choice mode."""
    tokens: int
    """Real (non-pad) tokens run through the model, after packing."""


@dataclass
class _Unit:
    """One packed sequence: a shared prefix, then each row's continuation in its own segment."""

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    rows: list[int]
    spans: list[tuple[int, int]]
    """Packed [start, stop) of each row's scored tokens."""
    prefix_len: int


def pack_units(seqs: Sequences, rows: np.ndarray) -> list[_Unit]:
    """Letter mode: one unit per row. Per-choice mode: the choices of a question share one prefix,
    encoded once; each choice attends to the prefix and to itself only (positions restart after
    the prefix), so the result equals scoring every choice on its own."""
    units: list[_Unit] = []
    i = 0
    while i < len(rows):
        r0 = int(rows[i])
        ids0, p = seqs.ids[r0], int(seqs.start[r0])
        group = [r0]
        while seqs.mode == "per_choice" and i + len(group) < len(rows):
            r = int(rows[i + len(group)])
            if seqs.row_question[r] != seqs.row_question[r0] or int(seqs.start[r]) != p or not np.array_equal(seqs.ids[r][:p], ids0[:p]):
                break
            group.append(r)
        i += len(group)
        toks, pos, seg, spans = [ids0[:p]], [np.arange(p)], [np.zeros(p, dtype=np.int64)], []
        cursor = p
        for k, r in enumerate(group):
            cont = seqs.ids[r][p:]
            toks.append(cont)
            pos.append(np.arange(p, p + len(cont)))
            seg.append(np.full(len(cont), k + 1, dtype=np.int64))
            spans.append((cursor, cursor + len(cont)))
            cursor += len(cont)
        units.append(_Unit(np.concatenate(toks), np.concatenate(pos), np.concatenate(seg), group, spans, p))
    return units


def _batch(units: list[_Unit], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, position ids, and a boolean (B, 1, T, T) mask (True = may attend)."""
    width = max(len(u.tokens) for u in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(units), width), dtype=torch.long)
    seg = torch.full((len(units), width), -1, dtype=torch.long)
    for b, u in enumerate(units):
        n = len(u.tokens)
        ids[b, :n] = torch.from_numpy(u.tokens)
        pos[b, :n] = torch.from_numpy(u.positions)
        seg[b, :n] = torch.from_numpy(u.segments)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    real = (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    mask = causal & same & real
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    return ids, pos, mask[:, None]


def _targets(seqs: Sequences, units: list[_Unit]) -> tuple[list[int], list[int], list[int], list[int]]:
    """For every scored token: batch index, predicting position, token id, and owning row slot."""
    bi, at, tok, owner = [], [], [], []
    slot = 0
    for b, u in enumerate(units):
        for (a, z) in u.spans:
            if seqs.mode == "letter":
                bi.append(b)
                at.append(a - 1)
                owner.append(slot)
            else:
                preds = [u.prefix_len - 1] + list(range(a, z - 1))
                bi += [b] * len(preds)
                at += preds
                tok += u.tokens[a:z].tolist()
                owner += [slot] * len(preds)
            slot += 1
    return bi, at, tok, owner


def _head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base transformer and the output projection of a causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


@torch.inference_mode()
def forward_rows(
    model,
    seqs: Sequences,
    rows: np.ndarray,
    layers: list[int],
    *,
    pool: str = "last",
    pad_id: int = 0,
    batch_size: int = 32,
) -> ForwardOut:
    """Run the teacher over `rows` of `seqs` (packed, length-sorted batches): states and scores.

    `layers` are 1-based block indices (hidden_states[i] is the output of block i; the last one is
    after the final norm, as transformers returns it). Only the positions whose scores are needed go
    through the vocabulary projection.
    """
    base, lm_head = _head(model)
    rows = np.asarray(rows, dtype=np.int64)
    where = {int(r): i for i, r in enumerate(rows)}
    units = pack_units(seqs, rows)
    units.sort(key=lambda u: len(u.tokens))
    states = np.zeros((len(rows), len(layers), model.config.hidden_size), dtype=np.float16)
    scores = np.full((len(rows), seqs.score_width), -np.inf if seqs.mode == "letter" else 0.0, dtype=np.float32)
    budget = batch_size * max(1, int(np.mean([len(seqs.ids[r]) for r in rows])) if len(rows) else 1)
    b0 = 0
    while b0 < len(units):
        b1 = b0 + 1  # grow the batch up to a padded-token budget
        while b1 < len(units) and (b1 - b0 + 1) * len(units[b1].tokens) <= budget:
            b1 += 1
        batch = units[b0:b1]
        b0 = b1
        ids, pos, mask = _batch(batch, pad_id)
        hs = base(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False).hidden_states
        slots = [where[r] for u in batch for r in u.rows]
        spans = [(b, a, z) for b, u in enumerate(batch) for (a, z) in u.spans]
        for li, layer in enumerate(layers):
            h = hs[layer]
            if pool == "mean" and seqs.mode == "per_choice":
                vecs = torch.stack([h[b, a:z].mean(0) for b, a, z in spans])
            else:
                vecs = h[[b for b, _, _ in spans], [z - 1 for _, _, z in spans]]
            states[slots, li] = vecs.float().numpy().astype(np.float16)
        bi, at, tok, owner = _targets(seqs, batch)
        logp = torch.log_softmax(lm_head(hs[-1][bi, at]).float(), -1)
        if seqs.mode == "letter":
            lp = logp[:, torch.as_tensor(seqs.letter_ids)].numpy()
            for j, slot in enumerate(slots):
                k = int(seqs.n_choices[seqs.row_question[rows[slot]]])
                scores[slot, :k] = lp[j, :k]
        else:
            ll = logp.gather(1, torch.as_tensor(tok)[:, None])[:, 0].double()
            sums = torch.zeros(len(slots), dtype=torch.float64).index_add_(0, torch.as_tensor(owner), ll)
            counts = np.bincount(owner, minlength=len(slots))
            scores[slots, 0] = sums.numpy()
            scores[slots, 1] = counts
    tokens = int(sum(len(u.tokens) for u in units))
    return ForwardOut(states=states, scores=scores, tokens=tokens)


def teacher_choice_logprobs(seqs: Sequences, scores: np.ndarray, *, normalise: bool = False) -> np.ndarray:
    """(Q, C_max) teacher log-scores per choice (-inf for absent choices), from stored row scores."""
    if seqs.mode == "letter":
        return scores[:, : seqs.max_choices].astype(np.float64)
    out = np.full((seqs.n_questions, seqs.max_choices), -np.inf)
    ll = scores[:, 0] / np.maximum(scores[:, 1], 1.0) if normalise else scores[:, 0]
    out[seqs.row_question, seqs.row_choice] = ll
    return out
