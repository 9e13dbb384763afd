"""The run report: one results dict in, `report.json`, `report.md` and `probe_accuracy.png` out.

`results` is a plain JSON-able dict describing one pipeline run on a dataset's TEST split:

    dataset, mode, teacher                      str                      required
    splits            {split: n_questions}                               required
    teacher_logit     {test_acc, test_acc_norm?, source?}                required: test_acc
    probes            {per_layer: [{layer, family?, C?, val_acc, test_acc}, ...], sweep?: [...],
                       best: {layer, C?, val_acc, test_acc, family?, combine?, layers?},
                       oof_acc?, temperature?, ece_raw?, ece_calibrated?,
                       n_pool?, pool_acc?, pool_ece?}                    required: per_layer, best
                      A multi-layer candidate (in sweep, or best) has layer null, `combine` ('concat' or
                      'ensemble') and `layers`; per_layer holds single-layer probes only.
    n_layers, config_hash, config, chance       optional (chance = mean of 1/n_choices on test)
    vllm_baseline     {n_questions, test_acc, max_abs_diff_vs_transformers, tokens_per_s?} or null
    labels            {source: {train_label_acc}}                        optional
    students          [{source, test_acc, test_ci?: [lo, hi], val_acc?, best_epoch?, val_curve?: [...],
                        epochs?, train_seconds?, finetune?, model_dir?}, ...] optional
    student_pairs     [{a, b, diff, lo, hi, p_mcnemar}, ...]            optional (paired, same test questions)
    timings           {stage: seconds, ..., total?}                      optional
    dtypes            {section: {dtype, why}} (what 'auto' became)      optional
    machine           {cpus, cpu_flags}                                 optional
    versions          {package: version}                                 optional

Accuracies are fractions in [0, 1]; the Markdown shows them as percentages with one decimal.
`validate_results` checks it against the types in `engine.results` and raises `ValueError` naming the
first missing or malformed key (dotted path).
Every file is written atomically (a temp file in the same folder, then `os.replace`).
The plot uses matplotlib's Agg canvas directly (no pyplot, no display, no global figure state).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.results import RunResults, check, is_num

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "probe_accuracy.png"

_MISSING = "—"


# ----------------------------------------------------------------------------------------------- validation


def validate_results(results: Any) -> None:
    """Check the keys the report needs (`engine.results.RunResults`); raise `ValueError` naming the
    first missing or malformed one."""
    check(RunResults, results)


# ----------------------------------------------------------------------------------------------- formatting


def _finite(x: Any) -> float | None:
    if x is None or not is_num(x):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def fmt_pct(x: Any) -> str:
    """0.5163 -> '51.6%'; None or non-finite -> '—'."""
    f = _finite(x)
    return _MISSING if f is None else f"{100.0 * f:.1f}%"


def _fmt_num(x: Any, spec: str = "g") -> str:
    if x is None:
        return _MISSING
    f = _finite(x)
    if f is None:
        return str(x) if not is_num(x) else _MISSING
    return format(f, spec)


def _fmt_seconds(x: Any) -> str:
    f = _finite(x)
    if f is None:
        return _MISSING
    return f"{f:.1f} s" if f < 120 else f"{f:.1f} s ({f / 60:.1f} min)"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = {"l": "---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(sep[a] for a in align) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def chosen_marker(layer: Any) -> str:
    """How the chosen layer's cell reads in the per-layer table: '**18** ←'."""
    return f"**{layer}** ←"


def _layers_text(e: Mapping) -> str:
    """'2+5+7' for a multi-layer candidate's `layers`."""
    return "+".join(str(x) for x in e.get("layers") or [])


def _best_name(best: Mapping) -> str:
    """'logreg, layer 18' or 'concat of logreg, layers 2+5+7' (family omitted when absent)."""
    family = f"{best['family']}, " if best.get("family") else ""
    if best.get("layer") is None and best.get("combine"):
        return f"{best['combine']} of {family}layers {_layers_text(best)}"
    return f"{family}layer {best['layer']}"


def _combined_lines(probes: Mapping) -> list[str]:
    """A table of the multi-layer candidates in `probes.sweep`, if any."""
    rows = [[e["combine"], e.get("family") or "", _layers_text(e), _fmt_num(e.get("C")), fmt_pct(e["val_acc"]),
             fmt_pct(e["test_acc"])] for e in probes.get("sweep") or [] if e.get("combine")]
    if not rows:
        return []
    head = ["combination", "family", "layers", "C", "validation", "test"]
    return (["Multi-layer probes (they compete with the single-layer ones on validation):", ""]
            + _table(head, rows, ["l", "l", "l", "r", "r", "r"]) + [""])


def brittleness_lines(b: Mapping) -> list[str]:
    """The brittleness table (`vllm_baseline.brittleness`): accuracy per answer format and choice order,
    then the spread (max - min, and std) of each column."""
    has_probe = b.get("probe") is not None
    rows = [[e["variant"], fmt_pct(e["teacher_acc"]), *([fmt_pct(e.get("probe_acc"))] if has_probe else [])]
            for e in b["rows"]]
    for stat in ("range", "std"):
        cells = [fmt_pct((b["spread"].get(col) or {}).get(stat)) for col in ("teacher", "probe")]
        rows.append([f"**spread ({'max - min' if stat == 'range' else 'std'})**", cells[0], *cells[1:2 if has_probe else 1]])
    p = b.get("probe")
    head = ["format, choice order", "teacher letter logits",
            *([f"probe ({p['family']}, layer {p['layer']}, C={_fmt_num(p['C'])})"] if has_probe else [])]
    lines = [f"Brittleness: the same {b['n_questions']} test questions, letter prompts, labels written in "
             "each format and choices in other orders.", ""]
    lines += _table(head, rows, ["l", "r", *(["r"] if has_probe else [])])
    if not has_probe:
        lines += ["", "This run reads per-choice states, which hold no labels: its probe and its choice log-likelihoods "
                      "do not see the format or the order (the per-choice accuracies above apply unchanged). The "
                      "letter-mode run of the same data gives the probe's column."]
    return lines + [""]


# ----------------------------------------------------------------------------------------------- markdown


def render_markdown(results: Mapping) -> str:
    """The report as GitHub-flavoured Markdown; see the module docstring for the input."""
    validate_results(results)
    r = results
    probes = r["probes"]
    best = probes["best"]
    tl = r["teacher_logit"]
    lines: list[str] = [f"# Probe-KD report: {r['dataset']} ({r['mode']}), teacher {r['teacher']}", ""]

    splits = ", ".join(f"{k} {v}" for k, v in r["splits"].items()) or _MISSING
    meta = f"Questions used: {splits}."
    if r.get("n_layers") is not None:
        meta += f" Teacher layers: {r['n_layers']}."
    lines += [meta + " All accuracies below are on the test split unless marked otherwise.", ""]

    # 1. Teacher and probes.
    lines += ["## Teacher and probes on test", ""]
    rows: list[list[Any]] = [["Teacher logits", fmt_pct(tl["test_acc"]), tl.get("source") or ""]]
    if tl.get("test_acc_norm") is not None:
        rows.append(["Teacher logits, length-normalised", fmt_pct(tl["test_acc_norm"]), "per-token mean log-prob"])
    if tl.get("test_acc_norm_bytes") is not None:
        rows.append(["Teacher logits, byte-normalised", fmt_pct(tl["test_acc_norm_bytes"]),
                     "log-prob / choice length in characters: lm-eval's acc_norm"])
    vb = r.get("vllm_baseline")
    if vb:
        notes = [f"on {vb['n_questions']} test questions"]
        if vb.get("max_abs_diff_vs_transformers") is not None:
            notes.append(f"max abs diff vs transformers {_fmt_num(vb['max_abs_diff_vs_transformers'], '.2e')}")
        if vb.get("transformers_test_acc_same_questions") is not None:
            notes.append(f"transformers on the same questions {fmt_pct(vb['transformers_test_acc_same_questions'])}")
        if vb.get("tokens_per_s") is not None:
            notes.append(f"{_fmt_num(vb['tokens_per_s'], '.1f')} tokens/s")
        rows.append(["vLLM cross-check", fmt_pct(vb["test_acc"]), "; ".join(notes)])
    rows.append([
        f"Best probe ({_best_name(best)}, C={_fmt_num(best.get('C'))})",
        fmt_pct(best["test_acc"]),
        f"chosen on validation ({fmt_pct(best['val_acc'])})",
    ])
    if r.get("chance") is not None:
        rows.append(["Chance", fmt_pct(r["chance"]), "mean of 1/n_choices"])
    lines += _table(["", "accuracy", "note"], rows, ["l", "r", "l"]) + [""]

    if vb and vb.get("brittleness"):
        lines += ["## Answer formats and choice orders", ""] + brittleness_lines(vb["brittleness"])

    # 2. Probe accuracy by layer.
    lines += ["## Probe accuracy by layer", "", f"![Probe accuracy by layer]({PLOT_PNG})", ""]
    rows = []
    families = any(e.get("family") for e in probes["per_layer"])
    for e in probes["per_layer"]:
        layer = chosen_marker(e["layer"]) if e["layer"] == best["layer"] else str(e["layer"])
        rows.append([layer, *([e.get("family") or ""] if families else []), _fmt_num(e.get("C")), fmt_pct(e["val_acc"]),
                     fmt_pct(e["test_acc"])])
    head = ["layer", *(["family"] if families else []), "C", "validation", "test"]
    lines += _table(head, rows, ["l", *(["l"] if families else []), "r", "r", "r"])
    if families:
        lines += ["", "Each layer shows its best family and C on validation; `probes.sweep` in report.json has every fit."]
    if best["layer"] is not None:
        lines += ["", f"← marks the layer chosen on validation (layer {best['layer']}).", ""]
    else:
        lines += ["", f"The probe chosen on validation uses several layers ({_best_name(best)}).", ""]
    lines += _combined_lines(probes)

    # 3. Students.
    lines += ["## Students on test by label source", ""]
    labels = r.get("labels") or {}
    students = list(r.get("students") or [])
    rows = []
    for s in students:
        lab = labels.get(s["source"]) or {}
        ci = s.get("test_ci")
        acc = fmt_pct(s["test_acc"]) + (f" [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]" if ci else "")
        curve = " → ".join(fmt_pct(v) for v in (s.get("val_curve") or []))
        rows.append([
            s["source"], fmt_pct(lab.get("train_label_acc")), acc, _fmt_num(s.get("best_epoch")), curve or _MISSING,
            _fmt_seconds(s.get("train_seconds")),
        ])
    seen = {s["source"] for s in students}
    for source, lab in labels.items():
        if source not in seen:
            rows.append([source, fmt_pct((lab or {}).get("train_label_acc")), _MISSING, _MISSING, _MISSING, _MISSING])
    if rows:
        lines += _table(["source", "train-label accuracy", "student test accuracy [95% CI]", "epoch kept",
                         "validation accuracy by epoch", "seconds"], rows)
        lines += ["", "Train-label accuracy: how often that source's label equals the gold answer on train. The interval "
                  "is a percentile bootstrap over the test questions. Each student is the epoch with the best validation "
                  "accuracy; test never enters that choice."]
        dirs = [s for s in students if s.get("model_dir")]
        if dirs:
            lines += ["", "Student model folders (`distill predict DIR questions.jsonl`, `distill eval DIR`): "
                      + ", ".join(f"`{s['model_dir']}` ({s['source']})" for s in dirs)]
        lines += [""]
        pairs = r.get("student_pairs") or []
        if pairs:
            prow = [[f"{p['a']} − {p['b']}", f"{100 * p['diff']:+.1f}", f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]",
                     f"{p['p_mcnemar']:.3f}", "yes" if p["lo"] > 0 or p["hi"] < 0 else "no"] for p in pairs]
            lines += ["Paired differences on the same test questions (points; 95% paired bootstrap; McNemar's exact test):", ""]
            lines += _table(["difference", "points", "95% CI", "McNemar p", "interval excludes 0"], prow)
            lines += [""]
    else:
        lines += ["_No students were trained in this run._", ""]

    # 4. Calibration.
    lines += ["## Calibration", ""]
    cal = [
        ("Out-of-fold probe accuracy (train)", fmt_pct(probes.get("oof_acc")), probes.get("oof_acc")),
        ("Temperature", _fmt_num(probes.get("temperature"), ".3f"), probes.get("temperature")),
        ("ECE before calibration", fmt_pct(probes.get("ece_raw")), probes.get("ece_raw")),
        ("ECE after calibration", fmt_pct(probes.get("ece_calibrated")), probes.get("ece_calibrated")),
    ]
    cal_rows = [[name, text] for name, text, raw in cal if raw is not None]
    lines += (_table(["metric", "value"], cal_rows) if cal_rows else ["_No calibration recorded._"]) + [""]
    if probes.get("n_pool") is not None:
        lines += [f"Pseudo-labels on {probes['n_pool']} pool questions: acc {fmt_pct(probes.get('pool_acc'))}, "
                  f"ECE {fmt_pct(probes.get('pool_ece'))} (against the withheld gold; reported only).", ""]

    # 5. Timings and provenance.
    lines += ["## Timings", ""]
    timings = dict(r.get("timings") or {})
    total = timings.pop("total", None)
    rows = [[stage, _fmt_seconds(sec)] for stage, sec in timings.items()]
    if total is not None:
        rows.append(["**total**", _fmt_seconds(total)])
    lines += (_table(["stage", "seconds"], rows) if rows else ["_No timings recorded._"]) + [""]
    dtypes, machine = r.get("dtypes") or {}, r.get("machine") or {}
    if dtypes:
        lines += ["Compute dtypes: " + "; ".join(f"{k} {v['dtype']} ({v['why']})" for k, v in dtypes.items())
                  + (f". CPU flags: {', '.join(machine['cpu_flags'])}" if machine.get("cpu_flags") else "") + ".", ""]
    lines.append(f"Config hash: `{r.get('config_hash') or _MISSING}`")
    versions = r.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plot


def _plot_png_bytes(results: Mapping, *, dpi: int = 120, figsize: tuple[float, float] = (8.0, 4.5)) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    probes = results["probes"]
    best = probes["best"]
    entries = sorted(probes["per_layer"], key=lambda e: e["layer"])
    layers = [e["layer"] for e in entries]

    def ys(key: str) -> list[float]:
        return [math.nan if _finite(e.get(key)) is None else float(e[key]) for e in entries]

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(layers, ys("val_acc"), linestyle="--", marker=".", color="tab:blue", alpha=0.45,
            label="probe (validation)")
    ax.plot(layers, ys("test_acc"), linestyle="-", marker="o", markersize=4, color="tab:blue", label="probe (test)")
    teacher = _finite(results["teacher_logit"]["test_acc"])
    if teacher is not None:
        ax.axhline(teacher, color="tab:red", linewidth=1.5, label=f"teacher logits (test) {fmt_pct(teacher)}")
    chance = _finite(results.get("chance"))
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1.5, label=f"chance {fmt_pct(chance)}")
    best_test = _finite(best["test_acc"])
    if best["layer"] is None:  # a multi-layer probe: its member layers shaded, its test accuracy a line
        for layer in best.get("layers") or []:
            ax.axvline(layer, color="tab:orange", alpha=0.2, linewidth=6)
        if best_test is not None:
            ax.axhline(best_test, color="tab:orange", linestyle="--", linewidth=1.5,
                       label=f"chosen: {_best_name(best)} (test {fmt_pct(best_test)})")
    else:
        ax.axvline(best["layer"], color="tab:orange", alpha=0.3, linewidth=6)
    if best_test is not None and best["layer"] is not None:
        ax.plot([best["layer"]], [best_test], marker="*", markersize=16, color="tab:orange",
                markeredgecolor="black", linestyle="none",
                label=f"chosen layer {best['layer']} (test {fmt_pct(best_test)})")
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Probe accuracy by layer: {results['dataset']} ({results['mode']}), {results['teacher']}")
    ax.legend(loc="best", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


def plot_probe_accuracy(results: Mapping, path: str | Path) -> Path:
    """Probe test (solid) and validation (dashed) accuracy by layer, teacher and chance lines, chosen layer starred."""
    validate_results(results)
    path = Path(path)
    _atomic_write(path, _plot_png_bytes(results))
    return path


# ----------------------------------------------------------------------------------------------- files


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, tuples to lists, non-finite floats to null."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_report(results: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and probe_accuracy.png into out_dir.

    Returns {"json": ..., "markdown": ..., "plot": ...}. Validates before writing anything.
    """
    validate_results(results)
    out = Path(out_dir)
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "plot": out / PLOT_PNG}
    text = json.dumps(_jsonable(results), indent=2, sort_keys=True, allow_nan=False) + "\n"
    md = render_markdown(results)
    png = _plot_png_bytes(results)
    _atomic_write(paths["json"], text.encode())
    _atomic_write(paths["plot"], png)
    _atomic_write(paths["markdown"], md.encode())
    return paths
