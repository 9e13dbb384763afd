import numpy as np
import pytest

from engine import artifacts
from engine.config import PromptConfig
from engine.prompts import answer_texts, choice_label, letter_prompt, per_choice_texts
from engine.sequences import build_sequences
from engine.store import StoreError
from engine.tasks import Example

EX = Example(id="q1", question=" Which is a gas? ", choices=("rock", "steam", "ice"), answer=1)


@pytest.mark.parametrize(
    "fmt, label, listed",
    [(" {letter}", " B", "B. steam"), ("{letter}", "B", "B. steam"), ("({letter})", "(B)", "(B) steam"), ("{number}.", "2.", "2. steam")],
)
def test_answer_formats(fmt, label, listed):
    assert choice_label(1, fmt) == label
    text = letter_prompt(EX, fmt)
    assert text.startswith("Question: Which is a gas?\n") and text.endswith("\nAnswer:")
    assert listed in text.splitlines()
    assert answer_texts(3, fmt)[1] == label


def test_per_choice_texts():
    prefix, conts = per_choice_texts(EX)
    assert prefix == "Question: Which is a gas?\nAnswer:"
    assert conts == [" rock", " steam", " ice"]


def test_sequences_rows_and_truncation(tiny_model):
    from engine.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    long = Example(id="q2", question="why " * 300, choices=("a b c", "d"), answer=0)
    seqs = build_sequences([EX, long], tok, PromptConfig(mode="per_choice", max_length=64))
    assert seqs.n_rows == 5 and list(seqs.row_question) == [0, 0, 0, 1, 1]
    assert seqs.lengths().max() <= 64
    # the choice text survives truncation; the question loses tokens from its left
    r = 3
    assert tok.decode(seqs.ids[r][seqs.start[r]:]) == " a b c"
    sub = seqs.select(np.array([1]))
    assert sub.n_questions == 1 and sub.n_rows == 2 and list(sub.row_question) == [0, 0]
    letter = build_sequences([EX], tok, PromptConfig(mode="letter"))
    assert letter.n_rows == 1 and len(letter.letter_ids) == 3 and letter.start[0] == len(letter.ids[0])


def test_artifacts_commit_reuse_and_refuse(tmp_path):
    where = tmp_path / "probes"
    assert artifacts.load(where, {"a": 1}) is None
    artifacts.save(where, {"a": 1}, {"acc": 0.5}, {"probs": np.eye(3)})
    meta, arrays = artifacts.load(where, {"a": 1})
    assert meta["acc"] == 0.5 and np.array_equal(arrays["probs"], np.eye(3))
    with pytest.raises(StoreError, match="a: store has 1, config has 2"):
        artifacts.load(where, {"a": 2})
    with pytest.raises(StoreError, match="refusing to overwrite"):
        artifacts.save(where, {"a": 1}, {}, {})
    # object arrays (pickles) are never written or read
    with pytest.raises(ValueError):
        artifacts.save(tmp_path / "bad", {}, {}, {"x": np.array([{"k": 1}], dtype=object)})


@pytest.mark.parametrize("fmt", [" {letter}", "{letter}", "({letter})", "{number}."])
def test_letter_labels_are_told_apart_by_one_scored_token(tiny_model, fmt):
    """Shared leading label tokens (the '(' of '(A)') end the prompt; the next token is scored."""
    from engine.models import load_tokenizer
    from engine.sequences import label_tokens

    tok = load_tokenizer(str(tiny_model))
    shared, letter_ids = label_tokens(tok, 3, fmt)
    assert len(set(letter_ids.tolist())) == 3
    for i, label in enumerate(answer_texts(3, fmt)):
        assert tok.decode(shared + [int(letter_ids[i])]) == tok.decode(tok(label, add_special_tokens=False)["input_ids"][: len(shared) + 1])
    seqs = build_sequences([EX], tok, PromptConfig(mode="letter", answer_format=fmt))
    assert np.array_equal(seqs.letter_ids, letter_ids)
    prompt_ids = tok(letter_prompt(EX, fmt))["input_ids"]
    assert seqs.ids[0].tolist() == list(prompt_ids) + shared
    if fmt == "({letter})":
        assert tok.decode(shared).strip() == "("


def test_labels_no_token_tells_apart_are_refused():
    from engine.config import ConfigError
    from engine.sequences import label_tokens

    def chars(text, add_special_tokens=False):  # a character-level tokenizer
        return {"input_ids": [ord(c) for c in text]}

    shared, ids = label_tokens(chars, 3, "({letter})")
    assert shared == [ord("(")] and ids.tolist() == [ord("A"), ord("B"), ord("C")]
    with pytest.raises(ConfigError, match="prompt.answer_format: '{number}.' gives labels that no single token"):
        label_tokens(chars, 12, "{number}.")  # '1.' and '10.' first differ from '2.' on the same '1'


@pytest.mark.parametrize("dataset, split", [("arc_easy", "test"), ("arc_challenge", "test"), ("mmlu", "validation"),
                                            ("aqua_rat", "test")])
def test_both_modes_and_every_format_on_every_dataset(tiny_model, shared_data, dataset, split):
    """Every dataset reads in both modes; in letter mode every brittleness format tells its labels apart."""
    from engine.config import BaselineConfig, DataConfig
    from engine.models import load_tokenizer
    from engine.tasks import load_split

    tok = load_tokenizer(str(tiny_model))
    examples = load_split(DataConfig(dataset=dataset, source=str(shared_data / dataset), limit=40), split)
    per = build_sequences(examples, tok, PromptConfig(mode="per_choice"))
    assert per.n_rows == sum(len(ex.choices) for ex in examples) and (per.start < per.lengths()).all()
    for fmt in BaselineConfig().formats:
        letter = build_sequences(examples, tok, PromptConfig(mode="letter", answer_format=fmt))
        assert letter.n_rows == len(examples) and len(set(letter.letter_ids.tolist())) == letter.max_choices


# ---------------------------------------------------------------------------------------------
# Few-shot examples and chat templates

POOL = [Example(id=f"p{i}", question=f"Pool question {i}?", choices=(f"x{i}", f"y{i}"), answer=i % 2) for i in range(8)]
CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_fewshot_draws_never_hold_the_question_and_are_seeded():
    from engine.prompts import draw_shots
    from engine.sequences import shots_text

    me = POOL[3]
    for seed in range(20):
        shots = draw_shots(me, POOL, 3, seed)
        assert len(shots) == 3 and me not in shots and len({s.id for s in shots}) == 3
    same_text = Example(id="other-id", question=me.question, choices=me.choices, answer=me.answer)
    assert all(s.question != me.question for s in draw_shots(me, [*POOL, same_text], 7, 0))
    assert draw_shots(me, POOL, 3, 0) == draw_shots(me, POOL, 3, 0)  # seeded
    assert len({tuple(s.id for s in draw_shots(q, POOL, 3, 0)) for q in POOL}) > 1  # per question
    with pytest.raises(ValueError, match=r"prompt\.fewshot: 8 examples asked, but .* only 7 other questions"):
        draw_shots(me, POOL, 8, 0)
    shots = POOL[:2]
    assert shots_text(shots, "per_choice", " {letter}") == (
        "Question: Pool question 0?\nAnswer: x0\n\nQuestion: Pool question 1?\nAnswer: y1\n\n")
    assert shots_text(shots[:1], "letter", " {letter}") == "Question: Pool question 0?\nA. x0\nB. y0\nAnswer: A\n\n"


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_fewshot_and_chat_template_in_the_teacher_rows(tiny_model, mode):
    from engine.config import ConfigError
    from engine.models import load_tokenizer
    from engine.prompts import draw_shots
    from engine.sequences import shots_text

    tok = load_tokenizer(str(tiny_model))
    prompt = PromptConfig(mode=mode, fewshot=2, fewshot_seed=5)
    seqs = build_sequences([EX], tok, prompt, POOL)
    shots = draw_shots(EX, POOL, 2, 5)
    first = letter_prompt(EX, " {letter}") if mode == "letter" else per_choice_texts(EX)[0]
    want_prefix = tok(shots_text(shots, mode, " {letter}") + first)["input_ids"]
    assert list(seqs.ids[0][: len(want_prefix)]) == list(want_prefix)
    with pytest.raises(ConfigError, match="no chat template"):
        build_sequences([EX], tok, PromptConfig(mode=mode, chat_template=True))

    tok.chat_template = CHAT
    chat = build_sequences([EX], tok, PromptConfig(mode=mode, chat_template=True, fewshot=2, fewshot_seed=5), POOL)
    wrapped = "<|user|>" + shots_text(shots, mode, " {letter}") + first + "<|end|>\n<|assistant|>"
    prefix = tok(wrapped, add_special_tokens=False)["input_ids"]
    for r in range(chat.n_rows):
        ids, start = list(chat.ids[r]), int(chat.start[r])
        if mode == "per_choice":  # the scored continuation stays outside the template
            assert ids[:start] == prefix
            assert ids[start:] == tok(per_choice_texts(EX)[1][r].lstrip(), add_special_tokens=False)["input_ids"]
        else:
            assert ids[: len(prefix)] == prefix
    # The choice is the assistant's reply (no " " before it); a template that ends in whitespace gives it
    # to every continuation, as lm-eval does.
    tok.chat_template = CHAT.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    nl = build_sequences([EX], tok, PromptConfig(mode="per_choice", chat_template=True))
    if mode == "per_choice":
        assert list(nl.ids[0][int(nl.start[0]):]) == tok("\nrock", add_special_tokens=False)["input_ids"]


def test_new_prompt_fields_enter_the_store_identity_only_when_set():
    from dataclasses import replace

    from engine.config import Config, store_identity

    base = Config()
    assert "fewshot" not in store_identity(base)["prompt"] and "chat_template" not in store_identity(base)["prompt"]
    assert "normalise" not in store_identity(replace(base, prompt=replace(base.prompt, normalise="bytes")))["prompt"]
    shot = store_identity(replace(base, prompt=replace(base.prompt, fewshot=5)))["prompt"]
    assert (shot["fewshot"], shot["fewshot_split"], shot["fewshot_seed"]) == (5, "train", 0)
    assert store_identity(replace(base, prompt=replace(base.prompt, chat_template=True)))["prompt"]["chat_template"]


# ---------------------------------------------------------------------------------------------
# Prompt templates: the teacher's and the student's own

SUBJ = Example(id="q9", question="Which is a gas?", choices=("rock", "steam"), answer=1, subject="physics")


@pytest.mark.parametrize("mode, template, want", [
    ("per_choice", "Subject: {{ subject }}\nQ: {{ question }}\nA:", "Subject: physics\nQ: Which is a gas?\nA:"),
    ("letter", "{{ question }}\n{% for c in choices %}({{ labels[loop.index0] }}) {{ c }}\n{% endfor %}Answer:",
     "Which is a gas?\n(A) rock\n(B) steam\nAnswer:"),
])
def test_prompt_templates_for_both_modes(tiny_model, mode, template, want):
    from engine.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    seqs = build_sequences([SUBJ], tok, PromptConfig(mode=mode, template=template))
    prefix = tok(want)["input_ids"]
    assert list(seqs.ids[0][: len(prefix)]) == prefix
    if mode == "per_choice":
        assert int(seqs.start[0]) == len(prefix)  # the choice text is still the scored part
    shots = build_sequences([SUBJ], tok, PromptConfig(mode=mode, template=template, fewshot=1), POOL[:2])
    text = tok.decode(shots.ids[0])  # the solved example is written with the same template
    assert text.count(want.splitlines()[-1]) == 2 and "Pool question" in text


def test_bad_templates_fail_naming_the_field():
    from engine.config import ConfigError, StudentConfig
    from engine.models import load_tokenizer  # noqa: F401

    with pytest.raises(ConfigError, match=r"prompt\.template: not a valid Jinja template"):
        PromptConfig(template="{{ question ")
    with pytest.raises(ConfigError, match=r"student\.template: not a valid Jinja template"):
        StudentConfig(template="{% if %}")
    with pytest.raises(ConfigError, match=r"prompt\.template: template .* failed on question 'q1': 'topic' is undefined"):
        build_sequences([EX], None, PromptConfig(template="{{ topic }}"))
    with pytest.raises(ConfigError, match=r"prompt\.template: template .* renders empty for question 'q1'"):
        build_sequences([EX], None, PromptConfig(template="{{ '' }}"))


def test_the_students_own_input_template(tiny_bert):
    from transformers import AutoTokenizer

    from engine.student_data import InputSpec, encode_examples

    btok = AutoTokenizer.from_pretrained(tiny_bert)
    spec = InputSpec("encoder", "per_choice", 64, template="{{ subject }}: {{ question }}")
    seqs = encode_examples([SUBJ], btok, spec)
    for r, choice in enumerate(SUBJ.choices):
        assert seqs.ids[r].tolist() == btok("physics: Which is a gas?", choice)["input_ids"]
    assert InputSpec(**spec.to_dict()) == spec  # saved in student.json, read back by `distill predict`
    assert "template" not in InputSpec("encoder", "per_choice", 64).to_dict()  # older students keep their fingerprint
