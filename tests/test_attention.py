"""engine.attention: the CPU paths compute what transformers' SDPA attention computes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.attention import ATTENTION, GROUPED_MAX_TOKENS, engine_sdpa, grouped, mask_bias
from engine.models import load_causal_lm
from engine.teacher import _batch, pack_units


def _packed_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(B, 1, T, T) as the teacher builds it: a shared prefix, then two segments that see the prefix and
    themselves; padding sees itself only."""
    seg = torch.full((len(lengths), width), -1)
    for b, n in enumerate(lengths):
        p = n // 2
        seg[b, :p] = 0
        seg[b, p:n] = 1 + (torch.arange(n - p) >= (n - p) // 2).long()
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    real = (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    return ((causal & same & real) | torch.eye(width, dtype=torch.bool))[:, None]


def _qkv(B, H, G, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, 64, generator=g).to(dtype) for h in (H, G, G))
    return q.transpose(1, 2).contiguous().transpose(1, 2), k, v  # q as a transposed view, as in the models


def _reference(q, k, v, mask, scale):
    r = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1),
                                          attn_mask=mask, scale=scale)


@pytest.mark.parametrize("H,G", [(9, 3), (4, 4), (8, 1)])
def test_grouped_equals_sdpa_on_packed_rows(H, G):
    B, T = 3, 23
    q, k, v = _qkv(B, H, G, T, torch.float32)
    mask = _packed_mask([23, 17, 9], T)
    got = grouped(q, k, v, mask_bias(mask), 0.125)
    want = _reference(q, k, v, mask, 0.125)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=1e-5)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert (got.double() - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-6


def test_grouped_in_bf16_is_as_close_to_exact_as_sdpa():
    q, k, v = _qkv(4, 9, 3, 40, torch.bfloat16, seed=1)
    mask = _packed_mask([40, 33, 21, 8], 40)
    want = _reference(q, k, v, mask, 0.125)
    err = (grouped(q, k, v, mask_bias(mask), 0.125).double() - want).abs().mean()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert err <= 3 * (sdpa.double() - want).abs().mean()


def test_engine_sdpa_dispatch():
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    # short bf16 rows: the grouped path; long or float32 rows: SDPA reading grouped heads (bit-equal to
    # transformers' repeated heads)
    for T, dtype, path in ((12, torch.bfloat16, "grouped"), (GROUPED_MAX_TOKENS + 4, torch.bfloat16, "sdpa"),
                           (12, torch.float32, "sdpa")):
        q, k, v = _qkv(2, 9, 3, T, dtype)
        mask = _packed_mask([T, T - 5], T)
        out, weights = engine_sdpa(module, q, k, v, mask, scaling=0.125)
        assert weights is None and out.shape == (2, T, 9, 64)
        if path == "grouped":
            want = grouped(q, k, v, mask_bias(mask), 0.125)
        else:
            want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask,
                                                  scale=0.125)
        assert torch.equal(out, want.transpose(1, 2).contiguous())
    # an additive float mask is not ours: transformers' sdpa, unchanged
    q, k, v = _qkv(2, 9, 3, 10, torch.float32)
    fmask = torch.zeros(2, 1, 10, 10).masked_fill(~_packed_mask([10, 6], 10), float("-inf"))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    want, _ = sdpa_attention_forward(module, q, k, v, fmask, scaling=0.125)
    assert torch.equal(engine_sdpa(module, q, k, v, fmask, scaling=0.125)[0], want)


def test_loaded_models_use_it_and_match_sdpa(tiny_model, shared_data):
    from transformers import AutoModelForCausalLM

    from engine.config import DataConfig, PromptConfig
    from engine.models import load_tokenizer
    from engine.sequences import build_sequences
    from engine.tasks import load_split

    ours = load_causal_lm(str(tiny_model), "float32")
    assert ours.config._attn_implementation == ATTENTION
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = load_tokenizer(str(tiny_model))
    seqs = build_sequences(load_split(DataConfig(source=str(shared_data / "arc_easy")), "test")[:6], tok,
                           PromptConfig(mode="per_choice"))
    ids, pos, mask = _batch(pack_units(seqs, np.arange(seqs.n_rows)), tok.pad_token_id)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # a plain padded batch (transformers builds the mask) takes the same route
        c = ours(input_ids=ids[:, :20], attention_mask=(ids[:, :20] != -1).long()).logits
        d = theirs(input_ids=ids[:, :20], attention_mask=(ids[:, :20] != -1).long()).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    np.testing.assert_allclose(c.numpy(), d.numpy(), atol=1e-4)
