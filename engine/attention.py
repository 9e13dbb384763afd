"""The teacher's attention on a CPU: short rows as two batched matmuls, longer ones through SDPA.

The teacher forward runs packed rows of a few dozen tokens (a per-choice question and its choices:
about 45 on ARC-Easy) under an explicit mask. There torch's flash-attention kernel for CPUs spends its
time on per-block bookkeeping, not arithmetic: on the 2-core EPYC (avx512_bf16) it ran a (20 rows x
9 heads x 45 tokens) bf16 call in 1.48 ms where the two matmuls and the softmax take 0.45 ms
(`bench/results/cpu_forward.json`); the teacher's whole bf16 forward took 0.87 of transformers' `sdpa`
time per-choice, 0.85 letter (medians of 9 alternating runs). So on a CPU, 16-bit rows of at most `GROUPED_MAX_TOKENS` keys take
the materialised path (`grouped`): scores = QK^T in the model's dtype, scaled, masked and soft-maxed in
float32, then one matmul with V, each key/value head shared by its query heads without copies. That is
the arithmetic of transformers' `eager` attention, with the softmax input kept in float32. Against a
float32 forward, its bf16 teacher scores are as close as SDPA's (per-choice mean |diff| 0.053 against
0.057) and the stored states slightly further (0.076 against 0.074; letter 0.106 against 0.100).
Float32 and longer rows go to torch's SDPA with `enable_gqa`, which reads grouped heads itself:
transformers' `sdpa` instead copies the key and value heads (3x for the packaged SmolLM2) whenever a
mask is given on a CPU, for the sake of GPU kernels that cannot. That path is bit-equal to
transformers' `sdpa`, so float32 forwards (lm-eval parity, AVX2-only machines) are unchanged; the
materialised path did not make a float32 forward faster there.

`ATTENTION` is registered with transformers under that name, for attention and for masks (the mask
is transformers' own `sdpa` mask), and `engine.models.load_causal_lm` loads causal LMs with it.
Anything other than a CPU call with a boolean (B or 1, 1, T, S) mask and no extras goes to
transformers' `sdpa` unchanged: GPUs, caches, position biases, dropout.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "engine_sdpa"
"""The attention implementation's name, as `attn_implementation` and the model config spell it."""

GROUPED_MAX_TOKENS = 128
"""The most keys a 16-bit row may have for the materialised path on a CPU; beyond it SDPA's flash
kernel, whose cost per token stops being bookkeeping (`bench/results/cpu_forward.json`)."""


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as an additive float32 bias: 0 where True, float32's
    smallest value elsewhere (what transformers' `eager` attention adds)."""
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)


def grouped(query, key, value, bias, scaling: float):
    """softmax(QK^T * scaling + bias) V with the scores in float32: (B, H, T, D) query, (B, G, S, D) key
    and value (H a multiple of G: query head h reads key/value head h // (H/G), as transformers'
    `repeat_kv`), float32 `bias` (B or 1, 1, T, S) from `mask_bias`. Returns (B, H, T, D)."""
    B, H, T, D = query.shape
    G, S = key.shape[1], key.shape[2]
    r = H // G
    scores = torch.matmul(query.reshape(B, G, r * T, D), key.transpose(-1, -2)).view(B, G, r, T, S)
    scores = torch.add(bias[:, :, None], scores, alpha=scaling)  # = scores.float() * scaling, masked
    probs = torch.softmax(scores, -1).to(query.dtype).view(B, G, r * T, S)
    return torch.matmul(probs, value).view(B, H, T, D)


def engine_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: (B, H, T, D) query, (B, G, T, D) key and value;
    returns ((B, T, H, D) output, None)."""
    plain = (query.device.type == "cpu" and attention_mask is not None and attention_mask.dtype == torch.bool
             and not dropout and kwargs.get("position_bias") is None and kwargs.get("cache") is None
             and not kwargs.get("output_attentions", False) and query.shape[1] % key.shape[1] == 0
             and attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.dtype in (torch.bfloat16, torch.float16) and key.shape[2] <= GROUPED_MAX_TOKENS:
        out = grouped(query, key, value, mask_bias(attention_mask), scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `ATTENTION` known to transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION, engine_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
