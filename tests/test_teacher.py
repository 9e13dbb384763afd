"""The teacher forward on a tiny random Llama: packed per-choice rows equal one-at-a-time forwards."""

import numpy as np
import pytest
import torch

from engine.config import DataConfig, PromptConfig
from engine.models import load_causal_lm, load_tokenizer
from engine.sequences import build_sequences
from engine.tasks import load_split
from engine.teacher import forward_rows, pack_units, teacher_choice_logprobs

LAYERS = [1, 2, 4]


@pytest.fixture(scope="module")
def setup(tiny_model, shared_data):
    model = load_causal_lm(str(tiny_model), "float32")
    tok = load_tokenizer(str(tiny_model))
    examples = load_split(DataConfig(source=str(shared_data / "arc_easy")), "test")[:12]
    return model, tok, examples


def _reference(model, ids):
    with torch.no_grad():
        out = model(torch.as_tensor(ids)[None], output_hidden_states=True)
    return out


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_states_and_scores_match_plain_forward(setup, mode):
    model, tok, examples = setup
    seqs = build_sequences(examples, tok, PromptConfig(mode=mode))
    out = forward_rows(model, seqs, np.arange(seqs.n_rows), LAYERS, pad_id=tok.pad_token_id, batch_size=5)
    assert out.states.shape == (seqs.n_rows, len(LAYERS), model.config.hidden_size)
    assert out.states.dtype == np.float16
    for r in range(seqs.n_rows):
        ref = _reference(model, seqs.ids[r])
        want = torch.stack([ref.hidden_states[layer][0, -1] for layer in LAYERS]).numpy()
        np.testing.assert_allclose(out.states[r], want, atol=2e-2, rtol=1e-2)
        logp = torch.log_softmax(ref.logits[0].float(), -1)
        if mode == "per_choice":
            s = int(seqs.start[r])
            target = torch.as_tensor(seqs.ids[r][s:])
            ll = logp[s - 1 : -1].gather(1, target[:, None]).sum().item()
            assert out.scores[r, 0] == pytest.approx(ll, abs=1e-3)
            assert out.scores[r, 1] == len(target)
        else:
            k = int(seqs.n_choices[r])
            np.testing.assert_allclose(out.scores[r, :k], logp[-1, seqs.letter_ids[:k]].numpy(), atol=1e-4)
            assert np.isneginf(out.scores[r, k:]).all()


def test_packing_encodes_each_prefix_once(setup):
    _, tok, examples = setup
    seqs = build_sequences(examples, tok, PromptConfig(mode="per_choice"))
    units = pack_units(seqs, np.arange(seqs.n_rows))
    assert len(units) == len(examples)
    assert sum(len(u.tokens) for u in units) < 0.6 * seqs.lengths().sum()
    # a chunk boundary inside a question splits it into two units that still score every row
    half = pack_units(seqs.rows_view(0, 6), np.arange(6))
    assert sum(len(u.rows) for u in half) == 6


def test_mean_pooling_and_choice_logprobs(setup):
    model, tok, examples = setup
    seqs = build_sequences(examples[:3], tok, PromptConfig(mode="per_choice", pool="mean"))
    out = forward_rows(model, seqs, np.arange(seqs.n_rows), [2], pool="mean", pad_id=tok.pad_token_id)
    r = 1
    ref = _reference(model, seqs.ids[r]).hidden_states[2][0, int(seqs.start[r]) :].mean(0).numpy()
    np.testing.assert_allclose(out.states[r, 0], ref, atol=2e-2, rtol=1e-2)
    lp = teacher_choice_logprobs(seqs, out.scores)
    assert lp.shape == (3, seqs.max_choices)
    norm = teacher_choice_logprobs(seqs, out.scores, normalise="tokens")
    assert np.all(norm[np.isfinite(norm)] > lp[np.isfinite(lp)].min())
    # bytes: lm-eval's acc_norm, the log-likelihood over len(choice text), checked by hand
    from engine.teacher import choice_chars

    chars = choice_chars(examples[:3])
    by = teacher_choice_logprobs(seqs, out.scores, normalise="bytes", chars=chars)
    for r in range(seqs.n_rows):
        q, c = seqs.row_question[r], seqs.row_choice[r]
        assert by[q, c] == pytest.approx(out.scores[r, 0] / len(examples[q].choices[c]))


def test_forward_depth():
    from engine.teacher import forward_depth

    assert forward_depth([3, 8], 30, scores=False) == 8
    assert forward_depth([3, 8], 30, scores=True) == 30  # scores need the top: the same pass goes on
    assert forward_depth([3, 30], 30, scores=False) == 30  # layer n is after the final norm


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_early_exit_runs_no_block_above_the_deepest_layer(setup, mode):
    model, tok, examples = setup
    seqs = build_sequences(examples, tok, PromptConfig(mode=mode))
    rows = np.arange(seqs.n_rows)
    full = forward_rows(model, seqs, rows, LAYERS, pad_id=tok.pad_token_id, batch_size=5)
    calls = [0] * len(model.model.layers)
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(model.model.layers)]
    try:
        short = forward_rows(model, seqs, rows, [1, 2], pad_id=tok.pad_token_id, batch_size=5, scores=False)
    finally:
        for h in hooks:
            h.remove()
    assert short.scores is None
    assert calls[0] == calls[1] > 0 and calls[2] == calls[3] == 0
    np.testing.assert_array_equal(short.states, full.states[:, :2])  # same batches, same numbers
