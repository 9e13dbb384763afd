"""Prompt modes (`engine.modes.MODES`) and student scoring heads (`engine.heads.HEADS`) are registries:
adding one is one entry, which the config's checks and every stage then follow."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine import heads, modes
from engine.config import ConfigError, PromptConfig, from_dict
from engine.tasks import Example

torch.set_num_threads(1)  # the test machine is oversubscribed


def examples(shared_data, n: int) -> list[Example]:
    out = []
    with open(shared_data / "arc_easy" / "train.jsonl") as f:
        for line in f:
            if len(out) == n:
                break
            r = json.loads(line)
            out.append(Example(r["id"], r["question"], tuple(r["choices"]), int(r["answer"]), r.get("subject")))
    return out


class Bare(modes.PerChoice):
    """A toy mode: per-choice rows whose prefix is the bare question (no 'Question:' or 'Answer:'), and
    whose log-likelihoods are not normalisable."""

    name = "bare"
    doc = "per-choice rows after the bare question"
    normalisable = False

    def question_text(self, ex, prompt):
        return ex.question.strip()


@pytest.fixture
def bare(monkeypatch):
    monkeypatch.setitem(modes.MODES, Bare.name, Bare())
    return Bare.name


def test_every_mode_implements_the_whole_contract():
    methods = [k for k, v in vars(modes.PromptMode).items() if callable(v) and not k.startswith("_")]
    for mode in modes.MODES.values():
        assert mode.name and mode.doc
        missing = [k for k in methods if getattr(type(mode), k) is getattr(modes.PromptMode, k)]
        assert not missing, f"{mode.name} lacks {missing}"


def test_the_config_checks_read_the_registries(bare):
    with pytest.raises(ConfigError, match=r"prompt\.mode: must be one of \('letter', 'per_choice', 'bare'\)"):
        from_dict({"prompt": {"mode": "bar"}})
    with pytest.raises(ConfigError, match=r"student\.scoring: must be one of \('head', 'lm'\)"):
        from_dict({"student": {"scoring": "linear"}})
    cfg = from_dict({"prompt": {"mode": bare}, "student": {"mode": bare}, "probe": {"families": ["conditional_logit"]}})
    assert cfg.prompt.mode == cfg.student.mode == bare  # its rows are choices: a grouped family is fine
    with pytest.raises(ConfigError, match=r"prompt\.normalise"):  # the entry says its scores are not normalisable
        from_dict({"prompt": {"mode": bare, "normalise": "tokens"}})
    with pytest.raises(ConfigError, match=r"student\.finetune: 'head' trains a fresh head .* student\.scoring='lm'"):
        from_dict({"student": {"scoring": "lm", "finetune": "head"}})


def test_a_new_prompt_mode_is_one_entry(bare, shared_data, tiny_model):
    """The toy mode runs through the teacher's rows and forward, the probes and a student."""
    from transformers import AutoModelForCausalLM

    from engine import probes
    from engine import student as st
    from engine.models import load_tokenizer
    from engine.sequences import build_sequences
    from engine.teacher import forward_rows, teacher_choice_logprobs

    tok = load_tokenizer(str(tiny_model))
    exs = examples(shared_data, 8)
    seqs = build_sequences(exs, tok, PromptConfig(mode=bare))
    ref = build_sequences(exs, tok, PromptConfig(mode="per_choice"))
    assert seqs.mode == bare and seqs.n_rows == ref.n_rows and seqs.score_width == 2
    assert tok.decode(seqs.ids[0][: seqs.start[0]]) == exs[0].question.strip()
    np.testing.assert_array_equal([x[s:] for x, s in zip(seqs.ids, seqs.start)][0], ref.ids[0][ref.start[0]:])

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    out = forward_rows(model, seqs, np.arange(seqs.n_rows), [1, 2], pad_id=tok.pad_token_id)
    logp = teacher_choice_logprobs(seqs, out.scores)
    assert logp.shape == (8, seqs.max_choices) and np.isfinite(logp[seqs.row_question, seqs.row_choice]).all()
    oof = probes.cross_fit(out.states[:, 1].astype(np.float32), seqs, 1.0, 100, 2, 0, family="conditional_logit")
    np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-6)

    cfg = from_dict({"student": {"model": str(tiny_model), "mode": bare, "num_layers": 1}}).student
    torch.manual_seed(0)
    student = st.build_student(str(tiny_model), cfg, max_choices=seqs.max_choices, tokenizer=tok)
    rows = st.encode_examples(exs, tok, st.InputSpec(kind="decoder", mode=bare, max_length=64))
    probs = st.predict(student, rows, batch_size=4, pad_id=tok.pad_token_id)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def _build_unbiased(model, letter_ids):
    from torch import nn

    model.head = nn.Linear(int(model.backbone.config.hidden_size),
                           modes.prompt_mode(model.mode).head_width(model.max_choices), bias=False)


def test_a_new_scoring_head_is_one_entry(monkeypatch, shared_data, tiny_bert, tmp_path):
    """A toy head (a fresh linear head without a bias) is accepted by the config, built, trained in the
    regimes its entry says, saved apart and loaded back."""
    from engine import student as st
    from engine.student_folder import load_student, predict_examples, save_student

    entry = dataclasses.replace(heads.HEADS["head"], name="unbiased", doc="a linear head without bias",
                                build=_build_unbiased)
    monkeypatch.setitem(heads.HEADS, entry.name, entry)
    cfg = from_dict({"student": {"model": str(tiny_bert), "scoring": "unbiased", "finetune": "head",
                                 "num_layers": 1}}).student
    st.check_student(cfg, str(tiny_bert))
    tok, spec = st.student_inputs(cfg, str(tiny_bert), " {letter}")
    model = st.build_student(str(tiny_bert), cfg, max_choices=4, tokenizer=tok)
    assert model.head.bias is None
    assert st.set_trainable(model, "head") == ["head.weight"]
    assert "head.weight" in st.set_trainable(model, "top", 1)
    exs = examples(shared_data, 6)
    before = st.predict(model, st.encode_examples(exs, tok, spec), batch_size=3, pad_id=tok.pad_token_id)
    folder = save_student(tmp_path / "s", model, tok, spec, {"dtype": "float32"})
    assert (folder / "head.safetensors").is_file()
    loaded, ltok, info = load_student(folder)
    np.testing.assert_allclose(predict_examples(loaded, ltok, info, exs, batch_size=3), before, atol=1e-6)
    decoder_only = dataclasses.replace(entry, name="decoder_only", kinds=("decoder",), needs="reads a causal LM")
    monkeypatch.setitem(heads.HEADS, decoder_only.name, decoder_only)
    with pytest.raises(st.ModelError, match=r"student\.scoring: 'decoder_only' reads a causal LM, and .* is an "
                                            r"encoder; use 'head' or 'unbiased'"):
        st.check_student(dataclasses.replace(cfg, scoring="decoder_only"), str(tiny_bert))
