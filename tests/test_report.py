"""The run report: files written atomically, Markdown tables, the probe plot, and key validation."""

from __future__ import annotations

import copy
import json
import math

import pytest

from engine import report as rp

N_LAYERS = 30
BEST = 18


def make_results() -> dict:
    per_layer = []
    for layer in range(1, N_LAYERS + 1):
        # A bump peaking at the chosen layer; validation a little above test.
        test = 0.30 + 0.30 * math.exp(-(((layer - BEST) / 7.0) ** 2))
        per_layer.append({"layer": layer, "C": 0.01 if layer % 2 else 0.1, "val_acc": round(test + 0.01, 4),
                          "test_acc": round(test, 4)})
    best = dict(per_layer[BEST - 1])
    return {
        "dataset": "arc_easy",
        "mode": "per_choice",
        "teacher": "smollm2-135m-instruct",
        "n_layers": N_LAYERS,
        "config_hash": "abcd1234ef567890",
        "config": {"dataset": {"name": "arc_easy"}, "probe": {"Cs": [0.01, 0.1, 1.0]}},
        "splits": {"train": 600, "validation": 300, "test": 1000},
        "chance": 0.2497,
        "teacher_logit": {"test_acc": 0.5163, "test_acc_norm": 0.4718, "source": "transformers (extraction forward)"},
        "vllm_baseline": {"n_questions": 200, "test_acc": 0.52, "max_abs_diff_vs_transformers": 1.2e-4,
                          "tokens_per_s": 250.0},
        "probes": {"per_layer": per_layer, "best": best, "oof_acc": 0.5812, "temperature": 1.3,
                   "ece_raw": 0.0821, "ece_calibrated": 0.0312},
        "labels": {"gold": {"train_label_acc": 1.0}, "logit": {"train_label_acc": 0.5},
                   "probe": {"train_label_acc": 0.58}},
        "students": [
            {"source": "gold", "test_acc": 0.301, "test_ci": [0.25, 0.35], "best_epoch": 2, "val_curve": [0.28, 0.31],
             "epochs": 2, "train_seconds": 100.0, "model_dir": "runs/x/students/gold-1/model"},
            {"source": "logit", "test_acc": 0.284, "epochs": 2, "train_seconds": 98.5},
            {"source": "probe", "test_acc": 0.322, "epochs": 2, "train_seconds": 101.2},
        ],
        "student_pairs": [{"a": "probe", "b": "gold", "diff": 0.021, "lo": -0.01, "hi": 0.05, "p_mcnemar": 0.2},
                          {"a": "probe", "b": "logit", "diff": 0.038, "lo": 0.005, "hi": 0.07, "p_mcnemar": 0.03}],
        "timings": {"extract": 300.0, "probes": 60.0, "baseline": 90.0, "students": 200.0, "total": 700.0},
        "versions": {"torch": "2.6.0", "transformers": "4.57.0", "numpy": "2.3.5"},
    }


def section(md: str, title: str) -> str:
    """The text of one '## title' section."""
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def test_write_report_files(tmp_path):
    results = make_results()
    paths = rp.write_report(results, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "plot"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "out"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.json", "report.md", "probe_accuracy.png"}

    assert json.loads(paths["json"].read_text()) == results
    assert paths["markdown"].read_text() == rp.render_markdown(results)

    data = paths["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(paths["plot"])
    h, w = img.shape[:2]
    assert 500 <= h <= 600 and 900 <= w <= 1000  # 8 x 4.5 in at 120 dpi
    assert img[..., :3].std() > 0.05  # something was drawn


def test_markdown_tables():
    md = rp.render_markdown(make_results())
    assert md.startswith("# Probe-KD report: arc_easy (per_choice), teacher smollm2-135m-instruct")
    assert "train 600, validation 300, test 1000" in md

    top = section(md, "Teacher and probes on test")
    assert "| Teacher logits | 51.6% |" in top
    assert "| Teacher logits, length-normalised | 47.2% |" in top
    assert "vLLM cross-check | 52.0% | on 200 test questions; max abs diff vs transformers 1.20e-04" in top
    assert f"Best probe (layer {BEST}, C=0.1)" in top and "chosen on validation" in top

    layers = section(md, "Probe accuracy by layer")
    assert "| layer | C | validation | test |" in layers
    rows = [ln for ln in layers.splitlines() if ln.startswith("| ") and not ln.startswith("| layer")]
    assert len(rows) == N_LAYERS
    marked = [ln for ln in rows if "←" in ln]
    assert len(marked) == 1 and marked[0] == f"| **{BEST}** ← | 0.1 | 61.0% | 60.0% |"
    assert rows[0] == "| 1 | 0.01 | 31.1% | 30.1% |"

    students = section(md, "Students on test by label source")
    assert ("| source | train-label accuracy | student test accuracy [95% CI] | epoch kept | validation accuracy by epoch "
            "| seconds |") in students
    assert "| gold | 100.0% | 30.1% [25.0%, 35.0%] | 2 | 28.0% → 31.0% | 100.0 s |" in students
    assert "| probe | 58.0% | 32.2% | — | — | 101.2 s |" in students
    assert "`runs/x/students/gold-1/model` (gold)" in students
    assert "| probe − gold | +2.1 | [-1.0, +5.0] | 0.200 | no |" in students
    assert "| probe − logit | +3.8 | [+0.5, +7.0] | 0.030 | yes |" in students

    cal = section(md, "Calibration")
    for text in ("58.1%", "1.300", "8.2%", "3.1%"):
        assert text in cal

    tim = section(md, "Timings")
    assert "| extract | 300.0 s (5.0 min) |" in tim and "| **total** | 700.0 s (11.7 min) |" in tim
    assert "`abcd1234ef567890`" in tim


def test_optional_parts_absent(tmp_path):
    results = make_results()
    results["vllm_baseline"] = None
    for key in ("students", "labels", "timings", "versions", "chance", "config_hash", "config", "n_layers"):
        del results[key]
    del results["teacher_logit"]["test_acc_norm"]
    for key in ("oof_acc", "temperature", "ece_raw", "ece_calibrated"):
        del results["probes"][key]
    results["probes"]["per_layer"][3]["test_acc"] = None  # a layer without a test score

    md = rp.render_markdown(results)
    assert "vLLM" not in md and "length-normalised" not in md
    assert "No students were trained" in md
    assert "No calibration recorded" in md and "No timings recorded" in md
    assert "| 4 | 0.1 | " in md and md.count(" — |") >= 1
    paths = rp.write_report(results, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text()) == results


@pytest.mark.parametrize(
    "path",
    [("dataset",), ("splits",), ("teacher_logit",), ("teacher_logit", "test_acc"), ("probes", "best"),
     ("probes", "per_layer"), ("probes", "best", "layer")],
)
def test_missing_key_names_it(tmp_path, path):
    results = make_results()
    d = results
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]
    with pytest.raises(ValueError, match=r"\b" + r"\.".join(path) + ": missing required key"):
        rp.write_report(results, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written before validation


def test_malformed_values():
    results = make_results()
    bad = copy.deepcopy(results)
    del bad["probes"]["per_layer"][2]["val_acc"]
    with pytest.raises(ValueError, match=r"probes\.per_layer\[2\]\.val_acc"):
        rp.render_markdown(bad)
    bad = copy.deepcopy(results)
    bad["probes"]["per_layer"] = []
    with pytest.raises(ValueError, match="probes.per_layer"):
        rp.render_markdown(bad)
    bad = copy.deepcopy(results)
    bad["students"][1].pop("source")
    with pytest.raises(ValueError, match=r"students\[1\]\.source"):
        rp.render_markdown(bad)
    with pytest.raises(ValueError, match="expected a dict"):
        rp.render_markdown([])


def test_json_plain_values(tmp_path):
    import numpy as np

    results = make_results()
    results["probes"]["temperature"] = np.float32(1.5)
    results["probes"]["oof_acc"] = float("nan")
    results["splits"]["test"] = np.int64(1000)
    paths = rp.write_report(results, tmp_path)
    back = json.loads(paths["json"].read_text())
    assert back["probes"]["temperature"] == 1.5 and back["probes"]["oof_acc"] is None
    assert back["splits"]["test"] == 1000
    assert rp.fmt_pct(0.51634) == "51.6%" and rp.fmt_pct(None) == "—" and rp.fmt_pct(float("nan")) == "—"


def test_overwrite_leaves_no_temp_files(tmp_path):
    results = make_results()
    rp.write_report(results, tmp_path)
    results["teacher_logit"]["test_acc"] = 0.6
    paths = rp.write_report(results, tmp_path)
    assert "| Teacher logits | 60.0% |" in paths["markdown"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe_accuracy.png", "report.json", "report.md"]


def test_multi_layer_candidates_and_pool(tmp_path):
    results = make_results()
    probes = results["probes"]
    single = [dict(e, family="logreg", combine=None, layers=[e["layer"]]) for e in probes["per_layer"]]
    concat = {"family": "logreg", "combine": "concat", "layer": None, "layers": [17, 18], "C": 0.1, "val_acc": 0.66,
              "test_acc": 0.63}
    ensemble = dict(concat, combine="ensemble", val_acc=0.64, test_acc=0.655)
    probes.update(sweep=single + [concat, ensemble], best=dict(concat), n_pool=540, pool_acc=0.5712, pool_ece=0.0432)

    md = rp.render_markdown(results)
    top = section(md, "Teacher and probes on test")
    assert "| Best probe (concat of logreg, layers 17+18, C=0.1) | 63.0% | chosen on validation (66.0%) |" in top
    layers = section(md, "Probe accuracy by layer")
    assert "←" not in layers  # no single layer was chosen
    assert "The probe chosen on validation uses several layers (concat of logreg, layers 17+18)." in layers
    assert "| combination | family | layers | C | validation | test |" in layers
    assert "| concat | logreg | 17+18 | 0.1 | 66.0% | 63.0% |" in layers
    assert "| ensemble | logreg | 17+18 | 0.1 | 64.0% | 65.5% |" in layers
    per_layer_rows = [ln for ln in layers.split("| combination")[0].splitlines() if ln.startswith("| ") and "layer" not in ln]
    assert len(per_layer_rows) == N_LAYERS  # the curve stays single-layer
    assert "Pseudo-labels on 540 pool questions: acc 57.1%, ECE 4.3%" in section(md, "Calibration")

    paths = rp.write_report(results, tmp_path)  # the plot copes with a multi-layer best
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["probes"]["best"]["layers"] == [17, 18]


def test_no_combined_table_or_pool_line_by_default():
    md = rp.render_markdown(make_results())
    assert "combination" not in md and "Pseudo-labels" not in md


def _brittleness(with_probe: bool) -> dict:
    rows = [{"variant": f"{f!r}, original order", "answer_format": f, "permutation": 0, "teacher_acc": t,
             "probe_acc": p if with_probe else None}
            for f, t, p in ((" {letter}", 0.25, 0.40), ("({letter})", 0.31, 0.41), ("{number}.", 0.22, 0.39))]
    teacher, probe = [r["teacher_acc"] for r in rows], [0.40, 0.41, 0.39]

    def stats(a):
        return {"min": min(a), "max": max(a), "range": max(a) - min(a), "std": 0.0371}

    return {"n_questions": 150, "rows": rows,
            "probe": {"layer": 17, "family": "logreg", "C": 0.01} if with_probe else None,
            "spread": {"teacher": stats(teacher), "probe": stats(probe) if with_probe else None}}


@pytest.mark.parametrize("with_probe", [True, False])
def test_brittleness_table(with_probe):
    r = make_results()
    r["vllm_baseline"]["brittleness"] = _brittleness(with_probe)
    md = section(rp.render_markdown(r), "Answer formats and choice orders")
    assert "the same 150 test questions" in md
    assert "| '({letter})', original order | 31.0% |" + (" 41.0% |" if with_probe else "") in md
    assert ("| **spread (max - min)** | 9.0% |" + (" 2.0% |" if with_probe else "")) in md
    assert ("probe (logreg, layer 17, C=0.01)" in md) == with_probe
    assert ("per-choice states, which hold no labels" in md) == (not with_probe)
    assert "Answer formats" not in rp.render_markdown(make_results())  # no table without the data


def test_student_record_reads_an_artifact_meta():
    """A student artifact's meta.json, typed: the fields it knows, defaults for those older artifacts lack,
    and every field it holds as the meta says (what it does not hold, such as the config, stays there)."""
    from engine.results import StudentRecord

    meta = {"source": "probe", "seed": 2, "test_acc": 0.61, "val_acc": 0.6, "best_epoch": 3, "train_label_acc": 0.58,
            "history": [{"epoch": 1, "val_acc": 0.5}], "config": {"seed": 2}, "identity_hash": "x"}
    rec = StudentRecord.from_meta(meta, "/runs/students/probe-1")
    assert (rec.source, rec.seed, rec.test_acc, rec.artifact) == ("probe", 2, 0.61, "/runs/students/probe-1")
    assert rec.fit_window is None and rec.train_fraction == 1.0  # not in this meta: the defaults
    assert all(getattr(rec, k) == v for k, v in meta.items() if k not in ("config", "identity_hash"))
    with pytest.raises(TypeError):
        StudentRecord.from_meta({"source": "gold"}, "/x")  # a meta without the required fields is refused
