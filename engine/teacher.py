"""The teacher forward: hidden states of chosen layers plus the teacher's own scores, in one pass.

Letter mode: the state at the last prompt token ("Answer:"), and the log-probabilities of the choice
labels' tokens there. Per-choice mode: the state at the choice's last token (or the mean over the
choice's tokens), and the choice's log-likelihood (sum over its tokens) with its token count.
The vocabulary projection runs only at the positions whose scores are needed. What differs by mode
(scored positions, the scores' layout, packing, pooling) is the mode's entry in `engine.modes`.

Without the teacher's scores the forward stops at the deepest stored layer: the blocks above it never
run. With them, the same forward goes on to the top; any separate scoring pass would cost more, since
it would redo every block below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.decoder import decoder_of
from engine.modes import prompt_mode
from engine.sequences import Sequences


@dataclass
class ForwardOut:
    states: np.ndarray
    """(rows, layers, hidden) float16."""
    scores: np.ndarray | None
    """None when not asked for; else (rows, S) float32: letter log-probs (S = C_max, -inf beyond a question's choices) in letter
    mode; [sum log-prob of the choice, number of choice tokens] in per-choice mode."""
    tokens: int
    """Real (non-pad) tokens run through the model, after packing."""
    projected: int = 0
    """Positions projected onto the vocabulary for the teacher's scores (0 without scores)."""


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
    """One unit per row, unless the mode's rows are a question's choices (`row_per_choice`): then the
    choices of a question share one prefix, encoded once; each choice attends to the prefix and to
    itself only (positions restart after the prefix), so the result equals scoring every choice on its own."""
    packs = prompt_mode(seqs.mode).row_per_choice
    units: list[_Unit] = []
    i = 0
    while i < len(rows):
        r0 = int(rows[i])
        ids0, p = seqs.ids[r0], int(seqs.start[r0])
        group = [r0]
        while packs and i + len(group) < len(rows):
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
    """For every scored position (the mode's `scored_positions`): batch index, predicting position, the
    token ids scored there, and owning row slot."""
    mode = prompt_mode(seqs.mode)
    bi, at, tok, owner = [], [], [], []
    slot = 0
    for b, u in enumerate(units):
        for (a, z) in u.spans:
            preds, scored = mode.scored_positions(u.tokens, u.prefix_len, a, z)
            bi += [b] * len(preds)
            at += preds
            tok += scored
            owner += [slot] * len(preds)
            slot += 1
    return bi, at, tok, owner


class _EarlyExit(Exception):
    """Raised by the hook on the deepest block needed: the blocks above it never run."""


def _blocks(base) -> torch.nn.ModuleList:
    blocks = getattr(base, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(base).__name__}: expected the decoder's blocks in `.layers` (a Llama/Qwen/Mistral-style model)")
    return blocks


def forward_depth(layers: list[int], n_blocks: int, scores: bool) -> int:
    """How many blocks must run: all of them when the teacher's scores or the final (normed) state are
    wanted, else only up to the deepest stored layer."""
    return n_blocks if scores or max(layers) >= n_blocks else max(layers)


def _states(base, ids, pos, mask, layers: list[int], depth: int,
            pick) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, list[int]]:
    """`pick(h, starts)` of the outputs of the blocks in `layers` (layer n = after the final norm, as
    transformers numbers hidden states) and, when all blocks ran, the final normed state; both as
    (B*T, hidden) rows, unit b's tokens from row `starts[b]` = b*T on. Each block's output is reduced
    to the rows' vectors as soon as it exists, so a batch never holds more than one full hidden-state
    tensor per block. Stops after block `depth`."""
    blocks, got, hooks = _blocks(base), {}, []
    n = len(blocks)
    starts = [b * ids.shape[1] for b in range(ids.shape[0])]

    def flat(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])

    def grab(i: int):
        def hook(_mod, _args, out):
            if i in layers:
                got[i] = pick(flat(out[0] if isinstance(out, tuple) else out), starts)
            if i == depth < n:
                raise _EarlyExit
        return hook

    for i in sorted({x for x in layers if x < n} | ({depth} if depth < n else set())):
        hooks.append(blocks[i - 1].register_forward_hook(grab(i)))
    final = None
    try:
        final = flat(base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state)
    except _EarlyExit:
        pass
    finally:
        for h in hooks:
            h.remove()
    if final is not None and n in layers:
        got[n] = pick(final, starts)
    return got, final, starts


def length_batches(units: list[_Unit], batch_size: int, mean_len: float) -> list[list[_Unit]]:
    """Length-sorted units cut into batches of at most `batch_size` mean-length sequences' worth of
    padded tokens: short sequences travel in big batches, long ones in small, padding stays small."""
    units = sorted(units, key=lambda u: len(u.tokens))
    budget = batch_size * max(1, int(mean_len))
    out, b0 = [], 0
    while b0 < len(units):
        b1 = b0 + 1
        while b1 < len(units) and (b1 - b0 + 1) * len(units[b1].tokens) <= budget:
            b1 += 1
        out.append(units[b0:b1])
        b0 = b1
    return out


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
    scores: bool = True,
) -> ForwardOut:
    """Run the teacher over `rows` of `seqs` (packed, length-bucketed batches): states and scores.

    `layers` are 1-based block indices (layer i is the output of block i; the last one is after the
    final norm, as transformers numbers hidden states). Without `scores` the forward stops at the
    deepest layer in `layers`. With them, only the positions whose scores are needed go through the
    vocabulary projection.
    """
    base, lm_head = model.get_decoder(), model.get_output_embeddings()
    fast = decoder_of(model)  # `engine.decoder.attach`: the blocks over unpadded tokens
    device = next(base.parameters()).device
    depth = forward_depth(layers, len(_blocks(base)), scores)
    rows = np.asarray(rows, dtype=np.int64)
    where = {int(r): i for i, r in enumerate(rows)}
    units = pack_units(seqs, rows)
    states = np.zeros((len(rows), len(layers), model.config.hidden_size), dtype=np.float16)
    mode = prompt_mode(seqs.mode)
    out_scores = None
    if scores:
        out_scores = np.full((len(rows), seqs.score_width), mode.score_fill, dtype=np.float32)
    mean_len = float(np.mean([len(seqs.ids[r]) for r in rows])) if len(rows) else 1.0
    projected = 0
    for batch in length_batches(units, batch_size, mean_len):
        ids, pos, mask = (t.to(device) for t in _batch(batch, pad_id))
        slots = [where[r] for u in batch for r in u.rows]
        spans = [(b, a, z) for b, u in enumerate(batch) for (a, z) in u.spans]

        def pick(h: torch.Tensor, starts: list[int], spans=spans) -> torch.Tensor:
            """Each row's vector from (tokens, hidden) `h`, unit b's tokens from row starts[b] on."""
            if pool == "mean" and mode.row_per_choice:
                return torch.stack([h[starts[b] + a: starts[b] + z].mean(0) for b, a, z in spans])
            return h[[starts[b] + z - 1 for b, _, z in spans]]

        if fast is not None:
            hs, final, starts = fast.states(ids, pos, mask, [len(u.tokens) for u in batch], layers, depth, pick)
        else:
            hs, final, starts = _states(base, ids, pos, mask, layers, depth, pick)
        for li, layer in enumerate(layers):
            states[slots, li] = hs[layer].float().cpu().numpy().astype(np.float16)
        if out_scores is not None:
            projected += _score(seqs, rows, batch, slots, lm_head, final, starts, out_scores)
    tokens = int(sum(len(u.tokens) for u in units))
    return ForwardOut(states=states, scores=out_scores, tokens=tokens, projected=projected)


def _score(seqs: Sequences, rows: np.ndarray, batch: list[_Unit], slots: list[int], lm_head, final: torch.Tensor,
           starts: list[int], out: np.ndarray) -> int:
    """Teacher scores of one batch from its final normed states (tokens, hidden), unit b's from row
    starts[b] on, projecting onto the vocabulary only where a score is needed. Returns how many
    positions were projected."""
    bi, at, tok, owner = _targets(seqs, batch)
    where = [starts[b] + t for b, t in zip(bi, at)]
    logp = torch.log_softmax(lm_head(final[where]), -1, dtype=torch.float32).cpu()  # = of .float(), one copy fewer
    prompt_mode(seqs.mode).fill_scores(seqs, rows, slots, logp, tok, owner, out)
    return len(at)


def choice_chars(examples) -> np.ndarray:
    """(Q, C_max) length of each choice's text in characters (0 where absent): what lm-eval's acc_norm
    divides by (`len(choice)`), which is the text's byte length for ASCII."""
    width = max((len(ex.choices) for ex in examples), default=0)
    out = np.zeros((len(examples), width))
    for q, ex in enumerate(examples):
        out[q, : len(ex.choices)] = [len(c) for c in ex.choices]
    return out


def teacher_choice_logprobs(seqs: Sequences, scores: np.ndarray, *, normalise: str = "none",
                            chars: np.ndarray | None = None) -> np.ndarray:
    """(Q, C_max) teacher log-scores per choice (-inf for absent choices), from stored row scores.

    Per-choice `normalise`: 'none' (the log-likelihood, lm-eval's acc), 'tokens' (divided by the choice's
    token count), 'bytes' (divided by its text length `chars`, from `choice_chars`: lm-eval's acc_norm)."""
    return prompt_mode(seqs.mode).choice_logprobs(seqs, scores, normalise, chars)
