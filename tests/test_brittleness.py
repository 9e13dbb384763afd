"""Brittleness variants: formats and seeded choice orders (pure), and the letter-mode table end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.brittleness import Variant, choice_order, permute, spread, variants
from engine.tasks import Example

EXAMPLES = [Example(f"q{i}", f"question {i}", tuple(f"c{i}-{j}" for j in range(4 + i % 2)), i % 4) for i in range(20)]


def test_variants_formats_then_permutations():
    vs = variants((" {letter}", "{letter}", " {letter}", "({letter})"), " {letter}", 2)
    assert vs == [Variant(" {letter}"), Variant("{letter}"), Variant("({letter})"),
                  Variant(" {letter}", 1), Variant(" {letter}", 2)]
    assert vs[3].name == "' {letter}', permutation 1" and vs[0].name == "' {letter}', original order"


def test_permute_moves_the_answer_with_its_choice():
    for k in (1, 2, 3):
        out = permute(EXAMPLES, seed=7, permutation=k)
        for ex, new in zip(EXAMPLES, out):
            assert sorted(new.choices) == sorted(ex.choices) and new.choices != ex.choices
            assert new.choices[new.answer] == ex.choices[ex.answer]
            assert (new.id, new.question) == (ex.id, ex.question)
    assert permute(EXAMPLES, 7, 0) == EXAMPLES
    assert permute(EXAMPLES, 7, 1) == permute(EXAMPLES, 7, 1)  # seeded
    assert permute(EXAMPLES, 7, 1) != permute(EXAMPLES, 7, 2) != permute(EXAMPLES, 8, 1)
    # a question's order does not depend on the other questions asked with it
    assert np.array_equal(choice_order(4, 7, 1, 3), choice_order(4, 7, 1, 3))
    assert permute(EXAMPLES[:4], 7, 1)[3] == permute(EXAMPLES, 7, 1)[3]


def test_spread():
    s = spread([0.5, None, 0.25, 0.75])
    assert s == pytest.approx({"min": 0.25, "max": 0.75, "range": 0.5, "std": np.std([0.5, 0.25, 0.75])})
    assert spread([None, None]) is None


def test_a_table_of_choice_orders_alone_has_no_probe_column():
    """Letter mode, `baseline.formats: []`, permutations 2: the baseline's identity does not name the probe
    (`scores_probe`), so its table scores the teacher only, even when `distill run` hands it the probe
    stage; with formats it would score the probe (never reached here: `probes` is a sentinel)."""
    from types import SimpleNamespace

    from cluster.brittleness import brittleness
    from engine.config import load
    from engine.identity import identity, scores_probe
    from engine.sequences import Sequences

    cfg = load("configs/tiny.yaml", ["prompt.mode=letter", "probe.families=[logreg]", "baseline.formats=[]",
                                     "baseline.permutations=2"])
    assert not scores_probe(cfg) and "probe" not in identity(cfg, "baseline")
    seqs = Sequences(mode="letter", ids=[np.arange(3)] * 2, start=np.zeros(2, dtype=np.int64),
                     row_question=np.arange(2), row_choice=np.zeros(2, dtype=np.int64),
                     n_choices=np.array([2, 2]), answer=np.array([0, 1]), letter_ids=np.array([5, 6]))
    asked = [(v, seqs) for v in variants((), " {letter}", 2)]
    logp = [np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))] * 2
    out = brittleness(SimpleNamespace(cfg=cfg), asked, logp, probes=object())
    assert out["probe"] is None and [r["probe_acc"] for r in out["rows"]] == [None, None]
    assert [r["teacher_acc"] for r in out["rows"]] == [1.0, 1.0] and out["spread"]["probe"] is None
    with_formats = load("configs/tiny.yaml", ["prompt.mode=letter", "probe.families=[logreg]"])
    assert scores_probe(with_formats) and "probe" in identity(with_formats, "baseline")


@pytest.mark.slow
def test_letter_mode_table_end_to_end(tmp_path, tiny_model):
    """`distill baseline` in letter mode prints the table; the data's own format and order reproduce
    the vLLM cross-check (teacher) and the stored test states (probe) on the same questions."""
    from conftest import distill

    out = tmp_path / "letter"
    args = ("configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "prompt.mode=letter",
            "probe.families=[logreg]")
    res = distill("baseline", *args)  # on an empty out_dir: what it reads runs first, announced
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert ("[distill] baseline: not made yet under this config: extract, probe; running them first "
            "(--no-prereqs refuses instead)") in res.stdout
    assert "[extract] committed" in res.stdout and "[probes] best on validation" in res.stdout
    assert "| format, choice order | teacher letter logits | probe (logreg, layer" in res.stdout

    (base_dir,) = out.glob("baseline-*")
    meta = json.loads((base_dir / "meta.json").read_text())
    b = meta["brittleness"]
    assert b["n_questions"] == 8 and len(b["rows"]) == 4 + 3
    assert [r["answer_format"] for r in b["rows"]] == [" {letter}", "{letter}", "({letter})", "{number}.", *[" {letter}"] * 3]
    own = b["rows"][0]
    assert (own["answer_format"], own["permutation"]) == (" {letter}", 0)
    assert own["teacher_acc"] == meta["test_acc"]
    (probe_dir,) = out.glob("probes-*")
    probe_meta = json.loads((probe_dir / "meta.json").read_text())
    assert b["probe"]["layer"] == max(probe_meta["per_layer"], key=lambda e: (e["val_acc"], -e["layer"]))["layer"]
    # the data's own format and order, through recomputed states = the same probe on the stored states
    from engine import store
    from engine.metrics import accuracy
    from engine.probes import choice_probs, fit_probe

    root = store.open_store(out / "activations.zarr")
    train, test = store.read_split(root, "train", "letter"), store.read_split(root, "test", "letter")
    p = b["probe"]
    probe = fit_probe(train.layer(p["layer"]), train.seqs, None, p["C"], 100, 0, p["family"])
    qs = np.load(base_dir / "questions.npy")
    assert own["probe_acc"] == accuracy(choice_probs(probe, test.layer(p["layer"]), test.seqs, qs), test.seqs.answer[qs])
    for col in ("teacher", "probe"):
        accs = [r[f"{col}_acc"] for r in b["rows"]]
        assert b["spread"][col]["range"] == pytest.approx(max(accs) - min(accs))
