"""Student: losses, the truncated backbone, batching, a short training run, and Ray Train end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import student as st
from engine import student_folder as sf
from engine.config import from_dict
from engine.metrics import accuracy
from engine.tasks import Example

torch.set_num_threads(1)  # the test machine is oversubscribed: 2 threads ran ~10x slower than 1


def load_examples(shared_data: Path, n: int, split: str = "train", skip: int = 0) -> list[Example]:
    out = []
    with open(shared_data / "arc_easy" / f"{split}.jsonl") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            r = json.loads(line)
            out.append(Example(r["id"], r["question"], tuple(r["choices"]), int(r["answer"]), r.get("subject")))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def sequences(shared_data, tokenizer, mode: str, n: int, skip: int = 0, kind: str = "decoder", max_length: int = 64):
    spec = st.InputSpec(kind=kind, mode=mode, max_length=max_length)
    return st.encode_examples(load_examples(shared_data, n, skip=skip), tokenizer, spec)


def student_cfg(model, **kw):
    return from_dict({"student": {"model": str(model), **kw}}).student


# ---------------------------------------------------------------------------------------------
# Losses


def _np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _random_case(seed=0, B=6, C=5):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([5, 4, 3, 5, 2, 4])[:B]
    mask = torch.arange(C)[None, :] < n[:, None]
    logits = torch.randn(B, C, generator=g) * 2
    logits = logits.masked_fill(~mask, float("-inf"))
    t = torch.rand(B, C, generator=g).masked_fill(~mask, 0.0)
    t = t / t.sum(-1, keepdim=True)
    gold = torch.tensor([int(torch.randint(0, int(k), (1,), generator=g)) for k in n])
    return logits, t, gold, n


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_soft_kl_matches_hand_computation(T):
    logits, t, gold, n = _random_case()
    got = st.student_loss(logits, t, gold, soft=True, temperature=T, alpha=1.0)
    want = []
    for b in range(len(n)):
        k = int(n[b])
        p = t[b, :k].double().numpy() ** (1 / T)
        p = p / p.sum()
        logq = _np_log_softmax(logits[b, :k].double().numpy() / T)
        want.append(T * T * float((p * (np.log(p) - logq)).sum()))
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5, abs=1e-6)


def test_alpha_zero_is_gold_cross_entropy():
    logits, t, gold, n = _random_case(1)
    ce = np.mean([-_np_log_softmax(logits[b, : int(n[b])].double().numpy())[int(gold[b])] for b in range(len(n))])
    for soft in (True, False):
        got = st.student_loss(logits, t, gold, soft=soft, temperature=3.0, alpha=0.0)
        assert float(got) == pytest.approx(ce, rel=1e-5)


def test_one_hot_targets_reduce_to_gold_ce():
    logits, _, gold, n = _random_case(2)
    hot = torch.from_numpy(st.one_hot(gold.numpy(), logits.shape[1]))
    ce = st.student_loss(logits, hot, gold, soft=True, temperature=1.0, alpha=0.0)
    for soft in (True, False):
        got = st.student_loss(logits, hot, gold, soft=soft, temperature=1.0, alpha=1.0)
        assert float(got) == pytest.approx(float(ce), rel=1e-5)


def test_hard_mode_is_ce_on_argmax_mixed_with_gold():
    logits, t, gold, n = _random_case(3)
    label = t.argmax(-1)
    logp = [_np_log_softmax(logits[b, : int(n[b])].double().numpy()) for b in range(len(n))]
    ce_t = np.mean([-lp[int(label[b])] for b, lp in enumerate(logp)])
    ce_g = np.mean([-lp[int(gold[b])] for b, lp in enumerate(logp)])
    got = st.student_loss(logits, t, gold, soft=False, temperature=4.0, alpha=0.3)
    assert float(got) == pytest.approx(0.3 * ce_t + 0.7 * ce_g, rel=1e-5)


@pytest.mark.parametrize("soft", [True, False])
def test_absent_choices_finite_loss_zero_grad(soft):
    logits, t, gold, n = _random_case(4)
    mask = torch.isfinite(logits)
    leaf = logits.clone().requires_grad_(True)  # holds -inf where a choice is absent
    loss = st.student_loss(leaf, t, gold, soft=soft, temperature=2.0, alpha=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[~mask] == 0).all()
    assert (leaf.grad[mask] != 0).any()
    # Finite garbage in absent slots changes nothing when the mask is given.
    junk = logits.masked_fill(~mask, 7.0)
    same = st.student_loss(junk, t, gold, soft=soft, temperature=2.0, alpha=0.5, mask=mask)
    assert float(same) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_temperature_scaling():
    logits, t, gold, n = _random_case(5)
    mask = torch.isfinite(logits)
    # T^2 factor: the loss at T is T^2 times the plain KL between the T-softened distributions.
    for T in (0.5, 2.0, 5.0):
        got = st.student_loss(logits, t, gold, soft=True, temperature=T, alpha=1.0)
        p = st.sharpen(t, mask, T)
        logq = torch.log_softmax(logits / T, -1).masked_fill(~mask, 0.0)
        kl = (torch.xlogy(p, p) - p * logq).sum(-1).mean()
        assert float(got) == pytest.approx(T * T * float(kl), rel=1e-5)
    # Re-sharpening: T > 1 flattens the targets, T < 1 sharpens, T = 1 leaves them.
    assert torch.allclose(st.sharpen(t, mask, 1.0), t, atol=1e-6)

    def ent(p):
        return float(-(torch.xlogy(p, p)).sum())

    assert ent(st.sharpen(t, mask, 3.0)) > ent(t) > ent(st.sharpen(t, mask, 0.3))
    # Zero loss when the student matches the targets at every T.
    match = torch.log(t.clamp_min(1e-30)).masked_fill(~mask, float("-inf"))
    for T in (0.5, 1.0, 3.0):
        assert float(st.student_loss(match, t, gold, soft=True, temperature=T, alpha=1.0)) == pytest.approx(0, abs=1e-5)
    # With T^2, gradients keep their scale as T grows (Hinton et al.): large-T gradient -> (z - v) / C.
    z = logits.masked_fill(~mask, 0.0)[:1, :5].clone().requires_grad_(True)
    v = torch.randn(1, 5)
    tv = torch.softmax(v, -1)
    for T in (100.0, 400.0):
        z.grad = None
        st.student_loss(z, tv, gold[:1], soft=True, temperature=T, alpha=1.0).backward()
        # targets_T = softmax(v / T) so the large-T limit is T^2 * (q_T - p_T) / T -> ((z - mean z) - (v - mean v)) / C
        want = ((z - z.mean()) - (v - v.mean())).detach() / 5
        assert torch.allclose(z.grad, want, atol=5e-2 * float(want.abs().max()))


def test_sharpen_does_not_underflow_at_small_temperature():
    t = torch.tensor([[1e-6, 2e-6, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    p = st.sharpen(t, mask, 0.05)
    assert torch.isfinite(p).all() and float(p.sum()) == pytest.approx(1.0)
    assert float(p[0, 1]) > 0.99 and float(p[0, 2]) == 0.0


def test_schedule_warms_up_then_decays():
    f = st.warmup_linear(100)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False)) and 0 < values[-1] < 0.05
    # A resumed run is placed at its step even when the restored optimizer carries lr 0.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    for group in opt.param_groups:
        group["lr"] = 0.0
        group["initial_lr"] = 0.5
    sched = st.make_scheduler(opt, 100, start_step=40)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * f(40)) and sched.last_epoch == 40


def test_optimizer_checkpoint_leaves_out_unused_embedding_rows_and_resumes_bit_for_bit(tmp_path):
    """The engine's (fused) AdamW, checkpointed through safetensors: an embedding's moments are written
    as the rows its tokens used, and training on from the restored optimizer gives the same weights."""
    from engine import fit

    def model_and_optimizer():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 4))
        return m, st.make_optimizer(m, 1e-2, 0.01)

    def step(m, opt, k):
        ids = torch.arange(40).reshape(8, 5) + 10 * (k % 3)  # tokens 0..59: most of the vocabulary unseen
        opt.zero_grad(set_to_none=True)
        m(ids).sum(1).logsumexp(-1).sum().backward()
        opt.step()

    m, opt = model_and_optimizer()
    assert opt.param_groups[0]["fused"]  # CPU float parameters: the fused kernel
    for k in range(3):
        step(m, opt, k)
    tensors, meta = fit.optimizer_state(opt)
    emb_moments = [k for k in meta["state"]["0"]["rows"]]
    assert sorted(emb_moments) == ["exp_avg", "exp_avg_sq"] and meta["state"]["0"]["rows"]["exp_avg"] == [1000, 16]
    assert tensors["0.exp_avg"].shape == (60, 16) and tensors["0.exp_avg.rows"].tolist() == list(range(60))
    assert not meta["state"]["1"]["rows"]  # the linear layer's 4 x 16 is kept whole
    fit.write_checkpoint(tmp_path, current={k: v.detach().clone() for k, v in m.state_dict().items()}, best=None,
                         optimizer=(tensors, meta), schedule_step=3, state={})
    back = fit.read_checkpoint(tmp_path, best=False)
    m2, opt2 = model_and_optimizer()
    m2.load_state_dict(back.current)
    fit.load_optimizer(opt2, back.optimizer)
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert opt2.param_groups[0]["fused"]
    for k in range(3, 6):
        step(m, opt, k)
        step(m2, opt2, k)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------
# Model, inputs and batches


def test_truncated_backbone_keeps_pretrained_layers(tiny_model):
    from safetensors.torch import load_file

    m = st.build_student(str(tiny_model), student_cfg(tiny_model, num_layers=2), max_choices=4)
    assert m.num_layers == 2 and len(m.backbone.layers) == 2 and m.pooling == "last"  # a decoder pools its last token
    ref = load_file(str(Path(tiny_model) / "model.safetensors"))
    own = m.backbone.state_dict()
    layer0 = [k for k in own if k.startswith("layers.0.")]
    assert layer0
    for k in layer0 + ["embed_tokens.weight", "norm.weight", "layers.1.mlp.up_proj.weight"]:
        assert torch.equal(own[k], ref["model." + k]), k
    with pytest.raises(st.ModelError, match="num_layers"):
        st.load_backbone(str(tiny_model), num_layers=9)


def test_encoder_reads_question_choice_pairs_in_its_own_vocabulary(shared_data, tiny_bert, tokenizer):
    """The student's rows are its own tokens: [CLS] question [SEP] choice [SEP] with segment ids, and an
    over-long input loses the start of the question, never the choice."""
    from transformers import AutoTokenizer

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    exs = load_examples(shared_data, 3)
    seqs = sequences(shared_data, btok, "per_choice", 3, kind="encoder", max_length=512)
    assert seqs.n_rows == sum(len(e.choices) for e in exs) and seqs.type_ids is not None
    r = 0
    for q, ex in enumerate(exs):
        for c, choice in enumerate(ex.choices):
            assert (seqs.row_question[r], seqs.row_choice[r]) == (q, c)
            want = btok(ex.question.strip(), choice.strip())
            assert seqs.ids[r].tolist() == want["input_ids"] and seqs.type_ids[r].tolist() == want["token_type_ids"]
            assert btok.decode(seqs.ids[r], skip_special_tokens=True).split()[-1] == btok.decode(
                btok(choice)["input_ids"], skip_special_tokens=True).split()[-1]
            r += 1
    assert seqs.ids[0].tolist() != sequences(shared_data, tokenizer, "per_choice", 1).ids[0].tolist()
    short = sequences(shared_data, btok, "per_choice", 3, kind="encoder", max_length=16)
    for r in range(short.n_rows):
        assert len(short.ids[r]) <= 16 and short.ids[r][0] == btok.cls_token_id  # [CLS] stays, the question's start goes
        choice = exs[short.row_question[r]].choices[short.row_choice[r]]
        tail = btok(choice.strip(), add_special_tokens=False)["input_ids"]
        if len(tail) < 10:
            assert short.ids[r][-len(tail) - 1 : -1].tolist() == tail  # the choice is whole
    letter = sequences(shared_data, btok, "letter", 3, kind="encoder")
    assert letter.n_rows == 3 and "answer :" in btok.decode(letter.ids[0])


def test_batches_group_questions(shared_data, tokenizer):
    seqs = sequences(shared_data, tokenizer, "per_choice", 10)
    targets = st.one_hot(seqs.answer, seqs.max_choices)
    gold = np.roll(seqs.answer, 1)
    batches = st.make_batches(seqs, targets, np.arange(10), 3, pad_id=7, rng=np.random.default_rng(0), gold=gold)
    assert sorted(np.concatenate([b.questions for b in batches]).tolist()) == list(range(10))
    rows_of = st.question_rows(seqs)
    for b in batches:
        assert b.input_ids.shape[0] == sum(len(rows_of[q]) for q in b.questions)
        for i in range(b.input_ids.shape[0]):
            q = b.questions[int(b.row_question[i])]
            r = rows_of[q][int(b.row_choice[i])]
            n = int(b.attention_mask[i].sum())
            assert n == len(seqs.ids[r]) and int(b.last_index[i]) == n - 1 and int(b.start[i]) == seqs.start[r]
            assert b.input_ids[i, :n].tolist() == seqs.ids[r].tolist()
            assert (b.input_ids[i, n:] == 7).all()
        assert torch.equal(b.gold, torch.from_numpy(gold[b.questions]))  # the answers the gold term may use


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_pooling(tiny_bert, shared_data, pooling):
    from transformers import AutoTokenizer

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    seqs = sequences(shared_data, btok, "per_choice", 2, kind="encoder")
    m = st.build_student(str(tiny_bert), student_cfg(tiny_bert, pooling=pooling), max_choices=4).eval()
    [b] = st.make_batches(seqs, None, np.arange(2), 2, btok.pad_token_id)
    got = m.pool(b.input_ids, b.attention_mask, b.token_type_ids, b.last_index)
    hidden = m.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask,
                        token_type_ids=b.token_type_ids).last_hidden_state
    for i in range(hidden.shape[0]):
        n = int(b.attention_mask[i].sum())
        want = {"mean": hidden[i, :n].mean(0), "first": hidden[i, 0], "last": hidden[i, n - 1]}[pooling]
        assert torch.allclose(got[i], want, atol=1e-5)


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
@pytest.mark.parametrize("scoring", ["head", "lm"])
def test_logits_shape_and_masking(shared_data, tokenizer, tiny_model, mode, scoring):
    seqs = sequences(shared_data, tokenizer, mode, 6)
    seqs.n_choices[1] = 3  # pretend question 1 has three choices (per-choice: drop its last row)
    if mode == "per_choice":
        keep = ~((seqs.row_question == 1) & (seqs.row_choice == 3))
        seqs = type(seqs)(mode=mode, ids=[x for x, k in zip(seqs.ids, keep, strict=True) if k], start=seqs.start[keep],
                          row_question=seqs.row_question[keep], row_choice=seqs.row_choice[keep],
                          n_choices=seqs.n_choices, answer=np.minimum(seqs.answer, 2), letter_ids=seqs.letter_ids)
    torch.manual_seed(0)
    m = st.build_student(str(tiny_model), student_cfg(tiny_model, mode=mode, scoring=scoring, num_layers=1),
                         max_choices=5, tokenizer=tokenizer)
    [b] = st.make_batches(seqs, None, np.arange(6), 6, tokenizer.pad_token_id)
    out = m(b)
    assert out.shape == (6, 4)
    absent = torch.arange(4)[None, :] >= b.n_choices[:, None]
    assert absent.sum() == 1 and torch.isneginf(out[absent]).all() and torch.isfinite(out[~absent]).all()
    probs = st.predict(m, seqs, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert probs.shape == (6, 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and probs[1, 3] == 0
    # Padding does not change a row's logits (right padding + last real token).
    [solo] = st.make_batches(seqs, None, np.array([int(b.questions[0])]), 1, tokenizer.pad_token_id)
    assert torch.allclose(m(solo)[0], out[0], atol=1e-4)
    if scoring == "lm" and mode == "per_choice":  # the choice's log-likelihood under the causal LM
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(tiny_model)
        lm.model.layers = lm.model.layers[:1]
        r = int(np.flatnonzero((seqs.row_question == b.questions[0]) & (seqs.row_choice == 0))[0])
        ids = torch.from_numpy(seqs.ids[r])[None]
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        want = float(logp[seqs.start[r] - 1 :].sum())
        assert float(out[0, 0]) == pytest.approx(want, abs=1e-3)


def test_lm_scoring_needs_a_decoder(tiny_bert):
    with pytest.raises(st.ModelError, match="student.scoring"):
        st.check_student(student_cfg(tiny_bert, scoring="lm"), str(tiny_bert))


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """A task a tiny student can learn from scratch: the right choice is the one that says 'water'."""
    rng = np.random.default_rng(seed)
    words = ["rock", "sand", "metal", "glass", "wood", "paper", "salt", "air"]
    out = []
    for i in range(n):
        choices = list(rng.choice(words, 3, replace=False))
        k = int(rng.integers(0, 4))
        choices.insert(k, "water")
        out.append(Example(f"s{i}", "Which of these is a liquid at room temperature?", tuple(choices), k))
    return out


@pytest.mark.parametrize("finetune", ["full", "top", "head"])
def test_student_with_its_own_vocabulary_learns(tiny_bert, finetune):
    """A BERT-style student whose vocabulary is not the teacher's learns a task from its own tokens in every
    regime, and the head regime's features equal the frozen backbone's pooled states."""
    from transformers import AutoTokenizer

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = student_cfg(tiny_bert, finetune=finetune, top_blocks=1)
    spec = st.InputSpec(kind="encoder", mode="per_choice", max_length=32)
    train, test = (st.encode_examples(synthetic_examples(n, seed), btok, spec) for n, seed in ((64, 0), (32, 1)))
    torch.manual_seed(0)
    m = st.build_student(str(tiny_bert), cfg, max_choices=4)
    names = st.set_trainable(m, finetune, 1)
    assert names == [n for n, p in m.named_parameters() if p.requires_grad]
    if finetune == "head":
        assert names == ["head.weight", "head.bias"]
    elif finetune == "top":
        assert any(".layer.1." in n for n in names) and not any(".layer.0." in n or "embeddings" in n for n in names)
    feats = {}
    if finetune == "head":
        feats = {"train": st.pool_features(m, train, batch_size=8, pad_id=btok.pad_token_id),
                 "test": st.pool_features(m, test, batch_size=8, pad_id=btok.pad_token_id)}
        [b] = st.make_batches(test, None, np.arange(2), 2, btok.pad_token_id)
        rows = np.concatenate(st.question_rows(test)[:2])
        m.eval()
        assert np.allclose(feats["test"][rows], m.pool(b.input_ids, b.attention_mask, b.token_type_ids).detach(), atol=1e-5)
    elif finetune == "top":  # the frozen bottom runs once per split; the blocks above start from its states
        feats = {r: st.TokenStates.of(s, st.bottom_states(m, s, top_blocks=1, batch_size=4, pad_id=btok.pad_token_id))
                 for r, s in (("train", train), ("test", test))}
        plain = st.predict(m, test, batch_size=8, pad_id=btok.pad_token_id)
        assert st.skip_bottom(m, 1) == 1
        assert np.allclose(st.predict(m, test, batch_size=8, pad_id=btok.pad_token_id, features=feats["test"]), plain, atol=1e-5)
        assert np.allclose(st.predict(m, test, batch_size=8, pad_id=btok.pad_token_id), plain, atol=1e-6)  # no states: all blocks
    lr, epochs = (3e-2, 30) if finetune == "head" else (3e-3, 6)
    opt = st.make_optimizer(m, lr, 0.0)
    targets = st.one_hot(train.answer, 4)
    for epoch in range(epochs):
        batches = st.make_batches(train, targets, np.arange(64), 8, btok.pad_token_id,
                                  rng=np.random.default_rng(epoch), features=feats.get("train"))
        st.train_epoch(m, batches, opt, soft=True, temperature=1.0, alpha=1.0)
    probs = st.predict(m, test, batch_size=8, pad_id=btok.pad_token_id, features=feats.get("test"))
    assert accuracy(probs, test.answer) >= 0.9, accuracy(probs, test.answer)


@pytest.mark.parametrize("finetune", ["full", "top"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_every_trainable_parameter_gets_a_gradient(tiny_bert, tiny_model, kind, finetune):
    """DDP (more than one Ray Train worker) fails on a trainable parameter that gets no gradient: a BERT's
    pooler, which the student never uses, must stay frozen."""
    path = tiny_bert if kind == "encoder" else tiny_model
    splits, _, pad = make_splits(path, kind=kind)
    m = st.build_student(str(path), student_cfg(path, finetune=finetune, top_blocks=1), max_choices=4)
    names = st.set_trainable(m, finetune, 1)
    if kind == "encoder":
        assert not any("pooler" in n for n in names)
    [b] = st.make_batches(splits["train"], st.one_hot(splits["train"].answer, 4), np.arange(4), 4, pad)
    st.student_loss(m(b), b.targets, b.gold, soft=True, temperature=1.0, alpha=1.0).backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []


def test_best_epoch_is_chosen_on_validation_only():
    hist = [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "test_acc": 0.9},
            {"epoch": 2, "val_acc": 0.6, "val_loss": 1.2, "test_acc": 0.1},
            {"epoch": 3, "val_acc": 0.6, "val_loss": 1.1, "test_acc": 0.2}]
    assert st.best_epoch(hist) == 3  # best accuracy, then lower loss; test plays no part
    assert st.best_epoch(hist[:1]) == 1
    hist[2]["val_loss"] = 1.2
    assert st.best_epoch(hist) == 2  # a full tie keeps the earlier epoch
    with pytest.raises(ValueError):
        st.best_epoch([])


def test_shards_cover_all_questions_evenly():
    parts = [st.shard_questions(10, r, 3, seed=1, epoch=2) for r in range(3)]
    assert {len(p) for p in parts} == {4}
    assert set(np.concatenate(parts).tolist()) == set(range(10))
    assert np.array_equal(st.shard_questions(10, 0, 1, seed=1, epoch=2), st.shard_questions(10, 0, 1, seed=1, epoch=2))


# ---------------------------------------------------------------------------------------------
# The student as a model folder


def test_saved_student_loads_and_predicts_the_same(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    spec = st.InputSpec(kind="encoder", mode="per_choice", max_length=32)
    exs = synthetic_examples(12)
    torch.manual_seed(1)
    m = st.build_student(str(tiny_bert), student_cfg(tiny_bert), max_choices=4)
    want = st.predict(m, st.encode_examples(exs, btok, spec), batch_size=4, pad_id=btok.pad_token_id)
    folder = sf.save_student(tmp_path / "s", m, btok, spec, {"source": "gold", "test_acc": 0.5})
    loaded, tok, info = sf.load_student(folder)
    assert info["source"] == "gold" and info["pooling"] == "mean" and info["input"]["kind"] == "encoder"
    assert np.allclose(sf.predict_examples(loaded, tok, info, exs, batch_size=5), want, atol=1e-5)
    plain = AutoModel.from_pretrained(folder)  # the backbone is a plain transformers model
    assert torch.equal(plain.embeddings.word_embeddings.weight, m.backbone.embeddings.word_embeddings.weight)
    with pytest.raises(sf.StudentError, match="exists"):
        sf.save_student(folder, m, btok, spec, {})


def with_tokenizer_of(donor: Path, folder: Path, out: Path) -> Path:
    """A copy of `folder` whose tokenizer files are `donor`'s."""
    from transformers import AutoTokenizer

    shutil.copytree(folder, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (out / f).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(donor).save_pretrained(out)
    return out


def test_bad_student_folders_fail_clearly(tiny_bert, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    m = st.build_student(str(tiny_bert), student_cfg(tiny_bert), max_choices=4)
    folder = sf.save_student(tmp_path / "s", m, btok, st.InputSpec("encoder", "per_choice", 32), {})
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(sf.StudentError, match="weights are missing"):
        sf.load_student(no_weights)
    other_tok = with_tokenizer_of(tiny_model, folder, tmp_path / "other-tokenizer")  # another model's BPE
    with pytest.raises(sf.StudentError, match="tokenizer"):
        sf.load_student(other_tok)
    with pytest.raises(sf.StudentError, match="not a student folder"):
        sf.load_student(tiny_bert)
    # A model folder whose tokenizer has more tokens than the model embeds is refused before training.
    big = with_tokenizer_of(tiny_model, tiny_bert, tmp_path / "big-vocab")  # 1024 tokens for a 600-token model
    with pytest.raises(st.ModelError, match="does not belong to this model"):
        st.check_student(student_cfg(big), str(big))
    (tiny_bert_copy := tmp_path / "no-safetensors").mkdir()
    shutil.copy(tiny_bert / "config.json", tiny_bert_copy / "config.json")
    btok.save_pretrained(tiny_bert_copy)
    with pytest.raises(st.ModelError, match="safetensors"):
        st.check_student(student_cfg(tiny_bert_copy), str(tiny_bert_copy))


# ---------------------------------------------------------------------------------------------
# Ray Train


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-st-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_AUTH_MODE",
                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local node bound to 127.0.0.1
    os.environ["RAY_AUTH_MODE"] = "disabled"
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": repo, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                                  "HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(temp, ignore_errors=True)


def make_splits(model_dir, kind: str = "decoder", n_train: int = 24, max_length: int = 32):
    from transformers import AutoTokenizer

    from tests.conftest import SHARED_DATA

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    spec = st.InputSpec(kind=kind, mode="per_choice", max_length=max_length)
    exs = {"train": load_examples(SHARED_DATA, n_train), "validation": load_examples(SHARED_DATA, 12, skip=n_train),
           "test": load_examples(SHARED_DATA, 16, skip=n_train + 12)}
    return {r: st.encode_examples(e, tok, spec) for r, e in exs.items()}, spec, tok.pad_token_id


def test_train_student_on_ray_and_resume(local_ray, tiny_model, tmp_path):
    from cluster.train import StudentJob, train_student

    splits, spec, pad = make_splits(tiny_model)
    train, test = splits["train"], splits["test"]
    targets = st.one_hot(train.answer, train.max_choices) * 0.7 + 0.3 / train.max_choices
    job = StudentJob("probe", 3, np.arange(train.n_questions), targets, train.answer)
    base = {"model": str(tiny_model), "num_layers": 2, "batch_size": 8, "max_length": 32, "lr": 1e-3,
            "num_workers": 1, "cpus_per_worker": 1}
    storage = tmp_path / "students"
    kw = dict(model_path=str(tiny_model), splits=splits, spec=spec, pad_id=pad, storage_dir=str(storage))

    first = train_student(from_dict({"student": {**base, "epochs": 1}}).student, job, **kw)
    assert first["source"] == "probe" and first["epochs"] == 1 and first["start_epoch"] == 0 and first["best_epoch"] == 1
    probs = first["test_probs"]
    assert probs.shape == (16, test.max_choices) and probs.dtype == np.float32
    present = np.arange(probs.shape[1])[None, :] < test.n_choices[:, None]
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs[~present] == 0).all()
    assert first["test_accuracy"] == pytest.approx(float((probs.argmax(1) == test.answer).mean()))
    h = first["history"][0]
    assert first["train_seconds"] > 0 and math.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1
    run_dir = storage / "student-probe"
    assert sorted(p.name for p in run_dir.glob("job_*")) == ["job_000_epoch_0001"]
    files = {p.name for p in (run_dir / "job_000_epoch_0001").iterdir()}
    assert {"trainable.safetensors", "optimizer.safetensors", "state.json"} <= files
    # Written straight into the storage (no temporary folder left), the best epoch's weights once.
    assert "best.safetensors" not in files and not list(run_dir.glob(".*tmp-*"))
    assert json.loads((run_dir / "job_000_epoch_0001" / "state.json").read_text())["best_is_current"] is True
    folder = Path(first["student_dir"])
    info = json.loads((folder / "student.json").read_text())
    assert info["source"] == "probe" and info["best_epoch"] == 1 and info["test_acc"] == pytest.approx(first["test_accuracy"])

    # Same storage and name, more epochs: Ray Train V2 hands the latest checkpoint to the new run.
    # Two workers this time, so DDP over gloo, sharding and rank-0 validation are exercised too.
    second = train_student(from_dict({"student": {**base, "epochs": 3, "num_workers": 2}}).student, job, **kw)
    assert second["start_epoch"] == 1 and second["epochs"] == 3
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][0] == first["history"][0]
    assert all("val_acc" in h for h in second["history"])
    assert second["best_epoch"] == st.best_epoch(second["history"])
    assert second["test_probs"].shape == probs.shape and np.allclose(second["test_probs"].sum(1), 1, atol=1e-5)
    assert [h["seconds"] > 0 for h in second["history"]] == [True] * 3 and len(second["report_seconds"]) == 1
    # The kept student is the best epoch's: loading its folder reproduces the reported test predictions.
    model, tok, info = sf.load_student(second["student_dir"])
    assert info["best_epoch"] == second["best_epoch"]
    assert info["dtype"] in ("float32", "bfloat16")  # what student.dtype 'auto' became on this machine
    again = st.predict(model, test, batch_size=32, pad_id=tok.pad_token_id, dtype=info["dtype"])  # the loop's batches
    assert np.allclose(again, second["test_probs"], atol=1e-5)
    print(f"ray fits: {first['wall_seconds']:.1f}s (1 worker), {second['wall_seconds']:.1f}s (2 workers)")


def _frozen_part_run(tiny_bert, tmp_path, **student):
    """A tiny-BERT gold student trained once on Ray in a regime with a frozen part (`student`): its
    splits, config, gold job, the `train_students` keywords, its result, and the cache files it wrote."""
    from cluster.train import StudentJob, train_students

    splits, spec, pad = make_splits(tiny_bert, kind="encoder")
    train = splits["train"]
    cfg = from_dict({"student": {"model": str(tiny_bert), "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1,
                                 **student}}).student
    feats = tmp_path / "features"
    gold = StudentJob("gold", 0, np.arange(train.n_questions), st.one_hot(train.answer, 4), train.answer)
    kw = dict(model_path=str(tiny_bert), splits=splits, spec=spec, pad_id=pad, storage_dir=str(tmp_path / "rt"),
              features_dir=str(feats))
    [a] = train_students(cfg, [gold], name="a", **kw)
    files = {p.name: p.stat().st_mtime_ns for p in feats.glob("*.npy")}
    assert len(files) == 3  # one per split
    return splits, cfg, gold, kw, a, files


def test_head_regime_caches_features_by_identity(local_ray, tiny_bert, tmp_path):
    """finetune='head': the frozen encoder's features are computed once per split and reused by a later
    run with other heads; heads train in one Ray Train run and come out as loadable folders."""
    from cluster.train import StudentJob, train_students

    splits, cfg, gold, kw, a, files = _frozen_part_run(tiny_bert, tmp_path, finetune="head", head_epochs=5, head_lr=1e-2)
    train, feats, pad = splits["train"], Path(kw["features_dir"]), kw["pad_id"]
    half = StudentJob("gold", 1, np.arange(12), st.one_hot(train.answer[:12], 4), train.answer[:12])
    b, c = train_students(cfg, [gold, half], name="b", **kw)
    assert {p.name: p.stat().st_mtime_ns for p in feats.glob("*.npy")} == files  # read, not recomputed
    assert np.allclose(a["test_probs"], b["test_probs"], atol=1e-6)  # same job, same student
    assert len(b["history"]) == 5 and b["best_epoch"] == st.best_epoch(b["history"])
    m, tok, info = sf.load_student(c["student_dir"])
    assert info["seed"] == 1 and np.allclose(st.predict(m, splits["test"], batch_size=32, pad_id=pad, dtype=info["dtype"]), c["test_probs"],
                                             atol=1e-5)
    # The frozen backbone is stored once and hard-linked into each head's folder.
    assert (Path(b["student_dir"]) / "model.safetensors").stat().st_ino == (
        Path(c["student_dir"]) / "model.safetensors").stat().st_ino


def test_top_regime_runs_the_frozen_bottom_once(local_ray, tiny_bert, tmp_path):
    """finetune='top': the frozen bottom blocks' token states are computed once per split and cached; the
    workers run only the top blocks, and the student's folder (every block) reproduces its test scores."""
    from cluster.train import train_students

    splits, cfg, gold, kw, a, files = _frozen_part_run(tiny_bert, tmp_path, finetune="top", top_blocks=1, epochs=2, lr=3e-3)
    feats = Path(kw["features_dir"])
    for role, seqs in splits.items():
        [f] = [p for p in feats.glob(f"{role}-*.npy")]
        assert np.load(f).shape[0] == int(seqs.lengths().sum())  # a state per real token
    [b] = train_students(cfg, [gold], name="b", **kw)
    assert {p.name: p.stat().st_mtime_ns for p in feats.glob("*.npy")} == files  # read, not recomputed
    assert np.allclose(a["test_probs"], b["test_probs"], atol=1e-6)
    m, tok, info = sf.load_student(a["student_dir"])
    again = st.predict(m, splits["test"], batch_size=32, pad_id=tok.pad_token_id, dtype=info["dtype"])
    assert np.allclose(again, a["test_probs"], atol=1e-5)


def test_resume_fingerprint_ignores_epochs_and_resources(shared_data, tokenizer):
    """A resumed run must match its checkpoint in all but epochs and resources (else the worker refuses)."""
    from cluster.train import StudentJob, pack_sequences, unpack_sequences
    from engine.fit import fingerprint as _fingerprint

    seqs = sequences(shared_data, tokenizer, "per_choice", 5)
    packed = pack_sequences(seqs)
    back = unpack_sequences(packed)
    assert all(np.array_equal(a, b) for a, b in zip(back.ids, seqs.ids, strict=True)) and back.mode == seqs.mode
    targets = st.one_hot(seqs.answer, 4)
    cfg = from_dict({"student": {"epochs": 1}})
    spec = st.InputSpec("decoder", "per_choice", 64).to_dict()

    def fp(c=cfg, t=targets, source="gold", splits=None):
        job = StudentJob(source, c.seed, np.arange(5), t, seqs.answer)
        return _fingerprint(c.student, job, "/m", splits or {"train": "x"}, spec, 4, 0)

    assert fp() == fp(from_dict({"student": {"epochs": 5, "num_workers": 3, "cpus_per_worker": 4, "max_failures": 2}}))
    assert fp() != fp(from_dict({"student": {"epochs": 1, "lr": 1e-3}}))
    assert fp() != fp(t=targets[::-1].copy())
    assert fp() != fp(source="probe")
    assert fp() != fp(splits={"train": "y"})


def resume_jobs(model_dir: str):
    """Three students (gold, probe, logit-like soft targets; other seeds and sizes) on the tiny model."""
    from cluster.train import StudentJob

    splits, spec, pad = make_splits(model_dir, n_train=40)
    train = splits["train"]
    soft = st.one_hot(train.answer, train.max_choices) * 0.6 + 0.4 / train.max_choices
    everything = np.arange(40)
    jobs = [StudentJob("gold", 0, everything, st.one_hot(train.answer, train.max_choices), train.answer),
            StudentJob("probe", 1, everything, soft, train.answer),
            StudentJob("logit", 2, everything[:24], soft[:24], train.answer[:24])]
    cfg = from_dict({"student": {"model": model_dir, "num_layers": 2, "epochs": 2, "batch_size": 8, "max_length": 32,
                                 "lr": 1e-3, "num_workers": 1, "cpus_per_worker": 1}})
    return cfg.student, jobs, dict(model_path=model_dir, splits=splits, spec=spec, pad_id=pad)


_KILLED_RUN = """
import sys
sys.path.insert(0, {repo!r})
from cluster import runtime
from cluster.train import train_students
from engine.config import RayConfig
from tests.test_student import resume_jobs
runtime.init(RayConfig(num_cpus=2, temp_dir={temp!r}))
student, jobs, kw = resume_jobs({model!r})
train_students(student, jobs, storage_dir={storage!r}, name="kill", **kw)
print("FINISHED", flush=True)
"""


def test_students_killed_mid_run_resume_from_the_last_checkpoint(local_ray, tiny_model, tmp_path):
    """SIGKILL a three-student run (driver, Ray and workers) after two checkpoints; the same call then
    resumes there, and every student ends exactly as in an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from cluster.train import train_students

    repo = str(Path(__file__).resolve().parents[1])
    storage = tmp_path / "killed"
    script = _KILLED_RUN.format(repo=repo, temp=f"/tmp/pkd-kill-{os.getpid()}", model=str(tiny_model),
                                storage=str(storage))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(list((storage / "kill").glob("job_*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert "FINISHED" not in out, "the run ended before it could be killed"
    made = sorted(p.name for p in (storage / "kill").glob("job_*"))
    assert made and made[-1] < "job_002_epoch_0002", made

    student, jobs, kw = resume_jobs(str(tiny_model))
    resumed = train_students(student, jobs, storage_dir=str(storage), name="kill", **kw)
    (job, epoch), = resumed[0]["resumes"]
    assert (job, epoch) >= (0, 1), resumed[0]["resumes"]  # started from a checkpoint, not from scratch
    whole = train_students(student, jobs, storage_dir=str(tmp_path / "whole"), name="whole", **kw)
    assert whole[0]["resumes"] == []
    held = whole[0]["report_seconds"]  # 3 jobs x 2 epochs = 6 checkpoints; the last one's hold is not kept
    assert len(held) == 5 and all(0 < s < 60 for s in held), held
    for a, b in zip(resumed, whole, strict=True):
        assert (a["source"], a["seed"], a["epochs"]) == (b["source"], b["seed"], 2)
        assert [h["epoch"] for h in a["history"]] == [1, 2] and a["best_epoch"] == b["best_epoch"]
        assert np.allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]], atol=1e-5)
        assert np.allclose([h["val_acc"] for h in a["history"]], [h["val_acc"] for h in b["history"]])
        assert np.allclose(a["test_probs"], b["test_probs"], atol=1e-5)
        assert Path(a["student_dir"], "student.json").is_file()
    print(f"killed after {made[-1]}; resumed at job {job}, epoch {epoch}")


def test_resume_point():
    from engine.fit import resume_point as _resume_point

    assert _resume_point(None, 2, 3) == (0, 0)
    assert _resume_point({"job": 0, "epoch": 1}, 2, 3) == (0, 1)  # the job goes on
    assert _resume_point({"job": 0, "epoch": 2}, 2, 3) == (1, 0)  # the next job starts fresh
    assert _resume_point({"job": 2, "epoch": 2}, 2, 3) == (2, 2)  # all done: results handed on
    assert _resume_point({"job": 0, "epoch": 1}, 3, 1) == (0, 1)  # one job asked for more epochs


def test_a_dead_worker_is_restarted_from_the_last_checkpoint(local_ray, tiny_model, tmp_path):
    """`student.max_failures` reaches Ray Train's FailureConfig: SIGKILL the training worker after its
    second checkpoint; the controller starts a new worker group, which resumes there and finishes."""
    import dataclasses
    import signal
    import threading
    import time

    import psutil
    from ray._private import worker as ray_worker

    from cluster.train import train_students

    student, jobs, kw = resume_jobs(str(tiny_model))
    storage, out = tmp_path / "retry", {}

    def fit(max_failures):
        try:
            out["res"] = train_students(dataclasses.replace(student, max_failures=max_failures), jobs,
                                        storage_dir=str(storage), name="retry", **kw)
        except Exception as err:  # noqa: BLE001 - handed to the test thread
            out["err"] = err

    thread = threading.Thread(target=fit, args=(1,))
    thread.start()
    deadline = time.monotonic() + 600
    while len(list((storage / "retry").glob("job_*"))) < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    # This test's own Ray: the training worker is a child of its raylet (other Ray instances may run here).
    raylet = psutil.Process(ray_worker._global_node.all_processes["raylet"][0].process.pid)
    workers = [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "err" not in out, out.get("err")
    res = out["res"]
    (job, epoch), = res[0]["resumes"]  # one restart, from a checkpoint
    assert (job, epoch) >= (0, 1)
    assert all(r["epochs"] == 2 and 0.0 <= r["test_accuracy"] <= 1.0 for r in res)
