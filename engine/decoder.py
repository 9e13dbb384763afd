"""The teacher's 16-bit CPU forward for Llama-family decoders, over unpadded tokens.

`engine.teacher.forward_rows` runs batches of packed units (a question and its choices, a few dozen
tokens each), right-padded to the batch's longest. Through transformers every block runs every
matmul and every elementwise pass over the padding too: 9,789 tokens for 8,967 real ones in the
200-question per-choice run of `bench/extract.py`, 17,987 for 16,869 in letter mode
(`bench/results/extract.json`, `padded_tokens`). `UnpaddedDecoder` runs the same blocks over the real
tokens only, as one (tokens, hidden) matrix:

- the norms, the output projection, the MLP and the residual stream see real tokens only;
- the normed input is scattered into the padded (batch, length) layout once per block for the
  query/key/value projections and the attention, which needs rows; the attention's output is
  gathered back;
- the attention is `engine.attention.grouped` (rows of at most `GROUPED_MAX_TOKENS` keys) with the
  mask turned into its additive bias once per batch, not once per block; longer rows go to SDPA;
- the rotary embedding is two passes (`x * cos + swap(x) * signed_sin`) instead of seven, and the
  RMSNorm reads its input once for the variance.

On the 2-core EPYC (avx512_bf16), the teacher's bf16 forward took 0.94 of the packed transformers
forward's time per-choice (0.92-1.04 over 8 rotating rounds) and 0.93 letter (0.91-0.98); against a
float32 forward its teacher scores are 0.058 off on average per-choice (0.053 before, 0.057 with
transformers' `sdpa`) and 0.111 letter (0.108, 0.110), the stored states 0.077 and 0.105 (0.076 and
0.106 before) (`bench/results/cpu_forward.json`).

It calls the model's own modules for the embedding, the projections (packed or not:
`engine.packed`), the rotary table and the final norm, so it holds no weights of its own. It is used
only where it computes what transformers computes, up to rounding: a CPU model in bf16 or fp16 whose
blocks have exactly the Llama layout (two RMSNorms, q/k/v/o projections, a SiLU-gated MLP: Llama,
SmolLM, Qwen2, Mistral without a sliding window), and whose every block agrees with transformers' on
a probe batch when `attach`ed. Float32 forwards stay on transformers, so the lm-eval parity is
measured on the same code as before.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import GROUPED_MAX_TOKENS, grouped, mask_bias

DTYPES = (torch.bfloat16, torch.float16)
"""Compute dtypes the unpadded forward is used for (float32 stays on transformers)."""

PROBE_TOLERANCE = 0.02
"""Largest mean |difference| between the two forwards' outputs of a block on the probe batch,
relative to the mean size of the block's update (its output minus its input), for `attach` to accept:
bf16 rounds to 2^-8 relative, and a few roundings apart is well inside it, while a wrong convention
(the rotary embedding's sign, in `tests/test_decoder.py`) is refused."""

_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' `LlamaRMSNorm` (float32 variance, scaled in float32, rounded, times the weight),
    with one read of `x` for the variance."""
    inv = torch.linalg.vector_norm(x, 2, -1, keepdim=True, dtype=torch.float32)
    inv = inv.pow_(2).div_(x.shape[-1]).add_(norm.variance_epsilon).rsqrt_()
    out = torch.empty_like(x)
    torch.mul(x, inv, out=out)
    return out.mul_(norm.weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` on (B, heads, T, head_dim) (a transposed view is fine): x*cos +
    rotate_half(x)*sin, where rotate_half(x)*sin = (second half, first half) * (-sin first half, sin
    second half). The result is contiguous (`torch.cat` lays it out), so the attention reads it without
    another copy."""
    half = x.shape[-1] // 2
    return torch.addcmul(torch.cat((x[..., half:], x[..., :half]), -1).mul_(signed_sin), x, cos)


def _is_silu(act) -> bool:
    """Whether the MLP's activation module computes SiLU (torch's, or transformers' `SiLUActivation`)."""
    if not isinstance(act, torch.nn.Module):
        return False
    x = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        return torch.equal(act(x), torch.nn.functional.silu(x))


def unsupported(model) -> str | None:
    """Why `model` cannot take the unpadded forward (None: it can)."""
    base = model.get_decoder()
    p = next(base.parameters())
    if p.device.type != "cpu" or p.dtype not in DTYPES:
        return f"for 16-bit CPU models only (this one: {p.dtype} on {p.device.type})"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"{type(base).__name__} has no `{name}`"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    for block in base.layers:
        parts = {n: set(dict(getattr(block, n).named_children())) for n in ("self_attn", "mlp")
                 if hasattr(block, n)}
        if (set(dict(block.named_children())) != _BLOCK or parts.get("self_attn") != _ATTENTION
                or parts.get("mlp") != _MLP):
            return f"{type(block).__name__} is not a Llama-layout block"
        if not _is_silu(block.mlp.act_fn):
            return f"{type(block).__name__}: activation {type(block.mlp.act_fn).__name__}, not SiLU"
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return f"{type(block).__name__}: norm {type(norm).__name__} is not an RMSNorm"
    return None


class _Layout:
    """One padded batch's real tokens: where they sit in the (B*T) layout and what every block reuses."""

    def __init__(self, base, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, lengths: list[int], dtype):
        self.B, self.T = B, T = ids.shape
        self.flat = torch.cat([torch.arange(n) + b * T for b, n in enumerate(lengths)])
        self.rows, self.cols = self.flat // T, self.flat % T
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        """Unit b's first row in the (tokens, hidden) matrix."""
        self.mask = mask
        self.bias = mask_bias(mask) if T <= GROUPED_MAX_TOKENS else None  # once per batch, not per block
        cos, sin = base.rotary_emb(torch.empty(0, dtype=dtype), pos.reshape(1, -1))
        D = cos.shape[-1]
        self.cos, self.sin = cos.view(B, 1, T, D), sin.view(B, 1, T, D).clone()  # for (B, heads, T, D)
        self.sin[..., : D // 2].neg_()
        self.x_pad = torch.zeros(B * T, base.config.hidden_size, dtype=dtype)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d) real-token rows in a fresh zero-padded (B, T, d) tensor."""
        out = torch.zeros(self.B * self.T, x.shape[-1], dtype=x.dtype)
        return out.index_copy_(0, self.flat, x).view(self.B, self.T, -1)


class UnpaddedDecoder:
    """A Llama-family decoder's blocks over the real tokens of a padded batch (see the module docstring)."""

    def __init__(self, model):
        self.base = model.get_decoder()
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def block(self, block, h: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """One decoder block on the (tokens, hidden) residual stream `h`."""
        attn, mlp, (B, T), H, G = block.self_attn, block.mlp, (lay.B, lay.T), self.heads, self.kv_heads
        x = lay.x_pad.index_copy_(0, lay.flat, rms_norm(h, block.input_layernorm)).view(B, T, -1)
        q = rotate(attn.q_proj(x).view(B, T, H, -1).transpose(1, 2), lay.cos, lay.sin)
        k = rotate(attn.k_proj(x).view(B, T, G, -1).transpose(1, 2), lay.cos, lay.sin)
        v = attn.v_proj(x).view(B, T, G, -1).transpose(1, 2)
        if lay.bias is not None:
            o = grouped(q, k, v, lay.bias, attn.scaling)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=lay.mask, scale=attn.scaling,
                                                                 enable_gqa=G != H)
        h = h + attn.o_proj(o.transpose(1, 2)[lay.rows, lay.cols].reshape(len(lay.flat), -1))
        x = rms_norm(h, block.post_attention_layernorm)
        gate = torch.nn.functional.silu(mlp.gate_proj(x), inplace=True)
        return h + mlp.down_proj(gate.mul_(mlp.up_proj(x)))

    @torch.inference_mode()
    def states(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, lengths: list[int], layers: list[int],
               depth: int, pick) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, list[int]]:
        """`engine.teacher._states`' contract for right-padded (B, T) `ids` and `pos` whose row b holds
        `lengths[b]` real tokens, and the boolean (B, 1, T, T) `mask`: `pick(h, starts)` of each block in
        `layers` and the final normed state when all blocks ran, as (tokens, hidden) real tokens only,
        unit b's from row `starts[b]` on; and `starts`."""
        base = self.base
        lay = _Layout(base, ids, pos, mask, lengths, base.embed_tokens.weight.dtype)
        h = base.embed_tokens(ids.reshape(-1)[lay.flat])
        blocks, got, final = base.layers, {}, None
        for i, block in enumerate(blocks[:depth], 1):
            h = self.block(block, h, lay)
            if i in layers and i < len(blocks):
                got[i] = pick(h, lay.starts)
        if depth == len(blocks):
            final = base.norm(h)
            if depth in layers:
                got[depth] = pick(final, lay.starts)
        return got, final, lay.starts


def attach(model) -> str:
    """Give a teacher `UnpaddedDecoder` (kept on the model; `engine.teacher.forward_rows` uses it) if it
    applies and agrees with the model's own forward on a probe batch. Returns 'unpadded', or why not."""
    why = unsupported(model)
    if why is None:
        fast = UnpaddedDecoder(model)
        why = _probe(model, fast)
        if why is None:
            model._engine_decoder = fast
            return "unpadded"
    model._engine_decoder = None
    return f"transformers ({why})"


def decoder_of(model) -> UnpaddedDecoder | None:
    """The model's `UnpaddedDecoder`, if `attach` gave it one."""
    return getattr(model, "_engine_decoder", None)


@torch.inference_mode()
def _probe(model, fast: UnpaddedDecoder) -> str | None:
    """Every block, both ways, on the same input: a padded batch of two packed units (a question with
    two choices after its prefix, and a bare row), the embedded tokens as the residual stream. None if
    each block's update of the residual stream agrees with transformers' within `PROBE_TOLERANCE` at
    the real tokens."""
    from engine.teacher import _batch, _Unit  # engine.teacher imports this module; no cycle at load time

    gen = torch.Generator().manual_seed(0)
    layouts = (  # (segments, positions): a 6-token prefix with choices of 4 and 3 tokens; a bare 9-token row
        ([0] * 6 + [1] * 4 + [2] * 3, [*range(6), 6, 7, 8, 9, 6, 7, 8]),
        ([0] * 9, [*range(9)]),
    )
    units = [_Unit(torch.randint(0, model.config.vocab_size, (len(seg),), generator=gen).numpy(), np.asarray(pos),
                   np.asarray(seg), [], [], seg.count(0)) for seg, pos in layouts]
    ids, pos, mask = _batch(units, 0)
    lengths = [len(u.tokens) for u in units]
    base = fast.base
    lay = _Layout(base, ids, pos, mask, lengths, base.embed_tokens.weight.dtype)
    h = base.embed_tokens(ids.reshape(-1)[lay.flat])
    h_pad = lay.padded(h)
    cos_sin = base.rotary_emb(h_pad, pos)
    worst = 0.0
    for block in base.layers:
        want = block(h_pad, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        want = (want[0] if isinstance(want, tuple) else want).reshape(-1, h.shape[-1])[lay.flat].float()
        got = fast.block(block, h, lay).float()
        update = (want - h.float()).abs().mean().clamp_min(1e-12)  # the block's own contribution, not the residual
        worst = max(worst, float((got - want).abs().mean() / update))
    if not worst <= PROBE_TOLERANCE:
        return f"a block's update on the probe batch is {worst:.3g} off transformers' (tolerance {PROBE_TOLERANCE})"
    return None
