"""engine.decoder: the unpadded 16-bit CPU forward agrees with transformers' and is used only where it applies."""

import numpy as np
import pytest
import torch

from engine import decoder
from engine.attention import GROUPED_MAX_TOKENS
from engine.config import DataConfig, PromptConfig
from engine.decoder import attach, decoder_of
from engine.models import load_causal_lm, load_tokenizer
from engine.packed import pack_linears
from engine.sequences import build_sequences
from engine.tasks import load_split
from engine.teacher import _batch, _states, _Unit, forward_rows


def random_model(kind: str, vocab: int):
    """A random bf16 decoder: a Llama with grouped key/value heads, or a Qwen2 (q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        for block in model.model.layers:  # Qwen2 starts its biases at zero; make them count
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.to(torch.bfloat16).eval()


def close(a: np.ndarray, b: np.ndarray, tol: float = 0.03) -> bool:
    """Mean |a - b| within `tol` of b's mean magnitude: bf16 roundings apart, not a different forward."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return np.array_equal(fin, np.isfinite(a)) and np.abs(a[fin] - b[fin]).mean() <= tol * np.abs(b[fin]).mean()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_unpadded_forward_matches_transformers(tiny_model, shared_data, kind, mode):
    tok = load_tokenizer(str(tiny_model))
    model = random_model(kind, len(tok))
    pack_linears(model)
    assert attach(model) == "unpadded" and decoder_of(model) is not None
    seqs = build_sequences(load_split(DataConfig(source=str(shared_data / "arc_easy")), "test")[:10], tok,
                           PromptConfig(mode=mode))
    rows = np.arange(seqs.n_rows)
    fast = decoder_of(model)
    for layers, scores, pool in (([1, 2, 3], True, "last"), ([1, 2], False, "last"), ([2, 3], True, "mean")):
        if pool == "mean" and mode == "letter":
            continue
        model._engine_decoder = fast
        got = forward_rows(model, seqs, rows, layers, pad_id=tok.pad_token_id, batch_size=4, scores=scores, pool=pool)
        model._engine_decoder = None
        want = forward_rows(model, seqs, rows, layers, pad_id=tok.pad_token_id, batch_size=4, scores=scores, pool=pool)
        assert got.tokens == want.tokens and got.projected == want.projected
        assert close(got.states, want.states), (layers, pool)
        assert (got.scores is None) == (want.scores is None) == (not scores)
        if scores:
            assert close(got.scores, want.scores), (layers, pool)


def test_rows_longer_than_the_grouped_path_go_through_sdpa(tiny_model):
    model = random_model("llama", 300)
    assert attach(model) == "unpadded"
    gen = np.random.default_rng(0)
    lengths = (GROUPED_MAX_TOKENS + 20, 40)  # one row past the two-matmul path's limit, one padded
    units = [_Unit(gen.integers(0, 300, n), np.arange(n), np.zeros(n, np.int64), [], [], n) for n in lengths]
    ids, pos, mask = _batch(units, 0)
    n = model.config.num_hidden_layers
    with torch.inference_mode():
        got, got_final, got_starts = decoder_of(model).states(ids, pos, mask, list(lengths), [1, n], n, _whole)
        want, want_final, want_starts = _states(model.get_decoder(), ids, pos, mask, [1, n], n, _whole)
    assert got_starts == [0, lengths[0]] and want_starts == [0, ids.shape[1]]
    for g, w in ((got[1], want[1]), (got[n], want[n]), (got_final, want_final)):
        # the unpadded rows are the real tokens, unit after unit; transformers' hold each unit's padding too
        w = torch.cat([w[s: s + m] for s, m in zip(want_starts, lengths)])
        assert g.shape == w.shape and close(g.float().numpy(), w.float().numpy())


def _whole(h: torch.Tensor, starts: list[int]) -> torch.Tensor:
    return h


def test_float32_and_unknown_layouts_stay_on_transformers(tiny_model, shared_data):
    fp32 = load_causal_lm(str(tiny_model), "float32")
    assert attach(fp32).startswith("transformers (for 16-bit CPU models only") and decoder_of(fp32) is None
    tok = load_tokenizer(str(tiny_model))
    seqs = build_sequences(load_split(DataConfig(source=str(shared_data / "arc_easy")), "test")[:4], tok,
                           PromptConfig(mode="per_choice"))
    a = forward_rows(fp32, seqs, np.arange(seqs.n_rows), [1, 4], pad_id=tok.pad_token_id, batch_size=4)
    b = forward_rows(load_causal_lm(str(tiny_model), "float32"), seqs, np.arange(seqs.n_rows), [1, 4],
                     pad_id=tok.pad_token_id, batch_size=4)
    assert np.array_equal(a.states, b.states) and np.array_equal(a.scores, b.scores)  # float32: unchanged

    gelu = random_model("llama", 300)
    gelu.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert "activation GELU, not SiLU" in attach(gelu) and decoder_of(gelu) is None
    extra = random_model("llama", 300)
    extra.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # e.g. Qwen3's per-head norms
    assert "not a Llama-layout block" in attach(extra)


def test_a_forward_that_disagrees_on_the_probe_is_refused(monkeypatch):
    model = random_model("llama", 300)
    rotate = decoder.rotate
    monkeypatch.setattr(decoder, "rotate", lambda x, cos, sin: rotate(x, cos, -sin))  # the other rotary sign
    why = attach(model)
    assert why.startswith("transformers (a block's update on the probe batch is") and decoder_of(model) is None
    monkeypatch.setattr(decoder, "rotate", rotate)
    assert attach(model) == "unpadded"
