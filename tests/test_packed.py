"""engine.packed: prepacked bf16 linears give the teacher forward's outputs bit for bit."""

import numpy as np
import pytest
import torch

from engine.config import DataConfig, PromptConfig
from engine.hardware import forward_flops_per_token, vocab_projection_flops
from engine.models import load_causal_lm, load_tokenizer
from engine.packed import PackedLinear, pack_linears
from engine.sequences import build_sequences
from engine.tasks import load_split
from engine.teacher import forward_rows


def test_packed_linear_equals_linear_with_bias():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    packed = PackedLinear(lin, 64)
    for shape in ((5, 96), (2, 7, 96)):
        x = torch.randn(*shape).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(packed(x), lin(x))


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_packed_teacher_forward_is_bit_equal(tiny_model, shared_data, mode):
    plain, packed = (load_causal_lm(str(tiny_model), "bfloat16") for _ in range(2))
    flops = (forward_flops_per_token(plain, 10.0), vocab_projection_flops(plain))
    n_blocks = plain.config.num_hidden_layers
    assert pack_linears(packed) == 7 * n_blocks + 1  # q, k, v, o, gate, up, down per block, and the head
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    assert (forward_flops_per_token(packed, 10.0), vocab_projection_flops(packed)) == flops
    tok = load_tokenizer(str(tiny_model))
    seqs = build_sequences(load_split(DataConfig(source=str(shared_data / "arc_easy")), "test")[:8], tok,
                           PromptConfig(mode=mode))
    rows, layers = np.arange(seqs.n_rows), [1, 2, n_blocks]
    a = forward_rows(plain, seqs, rows, layers, pad_id=tok.pad_token_id, batch_size=4)
    b = forward_rows(packed, seqs, rows, layers, pad_id=tok.pad_token_id, batch_size=4)
    assert np.array_equal(a.states, b.states) and np.array_equal(a.scores, b.scores)
    assert a.projected == b.projected > 0


def test_float32_is_left_to_mkl(tiny_model):
    model = load_causal_lm(str(tiny_model), "float32")
    assert pack_linears(model) == 0
    assert all(type(m) is not PackedLinear for m in model.modules())
