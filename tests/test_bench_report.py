"""engine.bench: intervals over seeds, the summary rows, the Markdown table and the plots (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from engine import bench


def cells():
    out = []
    for source, base in (("gold", 0.30), ("logit", 0.28), ("probe", 0.40), ("probe_pseudo", 0.35)):
        for fraction in (0.1, 1.0):
            if source == "probe_pseudo" and fraction == 1.0:
                continue
            for seed, bump in zip((2, 0, 1), (0.02, 0.0, 0.01), strict=True):
                out.append({"dataset": "arc_easy", "source": source, "fraction": fraction, "seed": seed,
                            "test_acc": base + bump + (0.1 if fraction == 1.0 else 0.0), "n_train": int(200 * fraction)})
    out.append({"dataset": "aqua_rat", "source": "gold", "fraction": 1.0, "seed": 0, "test_acc": 0.2, "n_train": 200})
    return out


def test_t_interval_matches_hand_computation():
    mean, half = bench.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    one = bench.t_interval([0.4])
    assert one[0] == 0.4 and math.isnan(one[1])
    with pytest.raises(ValueError, match="no values"):
        bench.t_interval([])


def test_summarise_groups_sorts_and_refuses_duplicates():
    rows = bench.summarise(cells())
    keys = [(r["dataset"], r["fraction"], r["source"]) for r in rows]
    assert keys[:4] == [("arc_easy", 0.1, s) for s in ("gold", "logit", "probe", "probe_pseudo")]
    assert keys[4:] == [("arc_easy", 1.0, s) for s in ("gold", "logit", "probe")] + [("aqua_rat", 1.0, "gold")]
    probe = rows[2]
    assert probe["seeds"] == [0, 1, 2] and np.allclose(probe["values"], [0.40, 0.41, 0.42])
    assert probe["mean"] == pytest.approx(0.41) and probe["n_train"] == 20 and probe["n_seeds"] == 3
    with pytest.raises(ValueError, match="appears twice"):
        bench.summarise(cells() + [cells()[0]])


def test_markdown_shows_cells_missing_cells_and_the_leader():
    refs = {"arc_easy": {"teacher": 0.52, "chance": 0.25, "probe": {0.1: [0.45, 0.47, 0.46], 1.0: [0.58, 0.57, 0.59]}}}
    md = bench.markdown(bench.summarise(cells()), refs)
    assert "### arc_easy" in md and "Teacher logits 52.0%, chance 25.0%" in md
    assert "| 10% | 20 | 31.0 ± 2.5 | 29.0 ± 2.5 | 41.0 ± 2.5 | 36.0 ± 2.5 | 46.0 ± 2.5 |" in md
    assert "| 100% | 200 | 41.0 ± 2.5 | 39.0 ± 2.5 | 51.0 ± 2.5 | — | 58.0 ± 2.5 |" in md
    assert "10%: probe leads probe_pseudo by 5.0 pts (CIs apart)" in md
    assert "### aqua_rat" in md and "| 100% | 200 | 20.0 | — |" in md  # one seed: no interval, no probe refs


def test_plot_writes_one_png_per_dataset(tmp_path):
    refs = {"arc_easy": {"teacher": 0.52, "chance": 0.25, "probe": {0.1: [0.45], 1.0: [0.58]}}}
    paths = bench.plot(bench.summarise(cells()), refs, tmp_path)
    assert set(paths) == {"arc_easy", "aqua_rat"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
