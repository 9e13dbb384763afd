"""engine.bench and its statistics on synthetic data with a known answer: intervals over seeds and test
questions, paired differences, the Markdown tables and the plots (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import bench
from engine.metrics import paired_difference, seeds_and_questions_bootstrap

N_TEST = 400


def synthetic(true_acc: dict[str, float], seeds=(0, 1, 2, 3, 4), fractions=(0.1, 1.0), seed_sd=0.0, rng_seed=0):
    """Cells whose per-question correctness is drawn with a known accuracy per source (plus a seed effect
    of sd `seed_sd`); every source and seed answers the same N_TEST questions."""
    rng = np.random.default_rng(rng_seed)
    cells, correct = [], {}
    for fraction in fractions:
        for source, acc in true_acc.items():
            if "pseudo" in source and fraction == 1.0:
                continue
            for s in seeds:
                p = np.clip(acc + seed_sd * rng.standard_normal(), 0.0, 1.0)
                c = rng.random(N_TEST) < p
                cell = {"dataset": "arc_easy", "regime": "head", "source": source, "fraction": fraction, "seed": s,
                        "test_acc": float(c.mean()), "n_train": int(200 * fraction)}
                cells.append(cell)
                correct[bench.key(cell)] = c
    return cells, correct


def test_one_seed_is_the_question_bootstrap_with_the_binomial_width():
    c = np.random.default_rng(1).random(2000) < 0.6
    b = seeds_and_questions_bootstrap(c[None, :], n_boot=4000)
    assert b["mean"] == pytest.approx(c.mean()) and b["n_seeds"] == 1 and b["n_questions"] == 2000
    half = 1.96 * math.sqrt(c.mean() * (1 - c.mean()) / 2000)  # the normal approximation of the same interval
    assert (b["hi"] - b["lo"]) / 2 == pytest.approx(half, rel=0.1)


def test_interval_grows_with_seed_spread_and_shrinks_with_questions():
    rng = np.random.default_rng(2)
    same = np.stack([rng.random(1000) < 0.5 for _ in range(5)])  # five seeds, no seed effect
    spread = np.stack([rng.random(1000) < p for p in (0.35, 0.45, 0.5, 0.55, 0.65)])  # a large seed effect
    w_same = np.diff([seeds_and_questions_bootstrap(same)[k] for k in ("lo", "hi")])[0]
    w_spread = np.diff([seeds_and_questions_bootstrap(spread)[k] for k in ("lo", "hi")])[0]
    assert w_spread > 2 * w_same
    small = np.stack([rng.random(100) < 0.5 for _ in range(5)])
    assert np.diff([seeds_and_questions_bootstrap(small)[k] for k in ("lo", "hi")])[0] > 2 * w_same
    with pytest.raises(ValueError, match="seeds, questions"):
        seeds_and_questions_bootstrap(np.zeros((0, 3)))


def test_intervals_cover_the_true_accuracy_about_95_percent():
    """Known answer: across 200 synthetic benchmarks with a seed effect, the interval holds the true
    mean accuracy about 95% of the time."""
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(200):
        seed_acc = 0.5 + 0.03 * rng.standard_normal(5)  # five seeds around a true 50%
        x = np.stack([rng.random(300) < p for p in seed_acc])
        b = seeds_and_questions_bootstrap(x, n_boot=500, seed=trial)
        hits += b["lo"] <= 0.5 <= b["hi"]
    assert 0.85 <= hits / 200 <= 0.995


def test_summary_and_paired_differences_find_a_known_gap():
    cells, correct = synthetic({"gold": 0.50, "logit": 0.40, "probe": 0.50, "probe_pseudo": 0.55, "logit_pseudo": 0.45})
    rows = bench.summarise(cells, correct, resamples=1000)
    keys = [(r["fraction"], r["source"]) for r in rows]
    assert keys[:5] == [(0.1, s) for s in ("gold", "logit", "probe", "logit_pseudo", "probe_pseudo")]
    assert keys[5:] == [(1.0, s) for s in ("gold", "logit", "probe")]
    for r in rows:
        assert r["lo"] < r["mean"] < r["hi"] and r["n_seeds"] == 5 and r["n_test"] == N_TEST
    pairs = {(p["fraction"], p["a"], p["b"]): p for p in bench.paired(cells, correct, resamples=1000)}
    pl = pairs[(1.0, "probe", "logit")]
    assert pl["diff"] == pytest.approx(0.10, abs=0.03) and pl["excludes_zero"] and pl["lo"] > 0
    pg = pairs[(1.0, "probe", "gold")]
    assert pg["lo"] < 0 < pg["hi"] and not pg["excludes_zero"]  # equal by construction
    assert pairs[(0.1, "probe_pseudo", "logit_pseudo")]["excludes_zero"]
    assert (1.0, "probe_pseudo", "logit_pseudo") not in pairs  # no pool at 100%
    per_seed = pl["per_seed"]
    assert [p["seed"] for p in per_seed] == [0, 1, 2, 3, 4]
    one = per_seed[0]
    ref = paired_difference(correct[("arc_easy", "head", "probe", 1.0, 0)], correct[("arc_easy", "head", "logit", 1.0, 0)],
                            n_boot=1000, seed=0)
    assert one["diff"] == pytest.approx(ref["diff"]) and one["lo"] == pytest.approx(ref["lo"])
    with pytest.raises(ValueError, match="appears twice"):
        bench.summarise(cells + [cells[0]], correct)


def test_markdown_marks_differences_whose_interval_excludes_zero():
    cells, correct = synthetic({"gold": 0.50, "logit": 0.40, "probe": 0.50})
    rows, pairs = bench.summarise(cells, correct, resamples=500), bench.paired(cells, correct, resamples=500)
    refs = {"arc_easy": {"teacher": 0.52, "chance": 0.25, "n_test": N_TEST, "probe": {0.1: [0.45], 1.0: [0.58]}}}
    md = bench.markdown(rows, pairs, refs)
    assert "### arc_easy" in md and "Teacher logits 52.0%, chance 25.0% (400 test questions)" in md
    assert "**Student regime `head`** (5 seeds)" in md
    assert "| train fraction | probe − logit | probe − gold |" in md
    line = next(x for x in md.splitlines() if x.startswith("| 100% |") and "✱" in x)
    assert line.count("✱") == 1  # probe - logit excludes 0, probe - gold does not
    words = bench.verdicts(pairs)
    assert "probe beats logit by" in words and "probe and gold are not told apart" in words


def test_plot_writes_accuracy_and_difference_pngs(tmp_path):
    cells, correct = synthetic({"gold": 0.50, "logit": 0.40, "probe": 0.50}, seeds=(0, 1))
    full, full_correct = synthetic({"gold": 0.55, "logit": 0.45, "probe": 0.55}, seeds=(0, 1), rng_seed=5)
    for c in full:
        old = bench.key(c)
        c["regime"] = "full"
        full_correct[bench.key(c)] = full_correct.pop(old)
    cells, correct = cells + full, correct | full_correct
    rows, pairs = bench.summarise(cells, correct, resamples=200), bench.paired(cells, correct, resamples=200)
    refs = {"arc_easy": {"teacher": 0.52, "chance": 0.25, "probe": {0.1: [0.45], 1.0: [0.58]}}}
    paths = bench.plot(rows, pairs, refs, tmp_path)
    assert set(paths) == {"arc_easy", "arc_easy_diff"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["regime"] for r in rows} == {"head", "full"}
