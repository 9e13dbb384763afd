"""The benchmark's numbers: per-cell student accuracies summarised over seeds, as a table and plots.

A cell is one trained student: {"dataset", "source", "fraction", "seed", "test_acc", "n_train", ...}.
`summarise` groups cells by (dataset, source, fraction) into mean and 95% Student-t interval over the
seeds; `markdown` and `plot` show them per dataset next to the references: the teacher's own
(logit) accuracy, chance, and the best probe's test accuracy at each fraction. Pure numpy/scipy;
matplotlib is imported only to plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOURCE_ORDER = ("gold", "logit", "probe", "probe_pseudo")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t interval; one value has no interval (nan)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval: no values")
    if x.size == 1:
        return float(x[0]), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def _source_key(source: str) -> tuple[int, str]:
    return (SOURCE_ORDER.index(source), "") if source in SOURCE_ORDER else (len(SOURCE_ORDER), source)


def summarise(cells: list[dict]) -> list[dict]:
    """One row per (dataset, source, fraction): the seeds' accuracies, their mean and 95% interval."""
    groups: dict[tuple, dict[int, dict]] = {}
    datasets: list[str] = []
    for c in cells:
        key = (c["dataset"], c["source"], float(c["fraction"]))
        if c["dataset"] not in datasets:
            datasets.append(c["dataset"])
        seeds = groups.setdefault(key, {})
        if c["seed"] in seeds:
            raise ValueError(f"summarise: cell {key + (c['seed'],)} appears twice")
        seeds[c["seed"]] = c
    rows = []
    for key in sorted(groups, key=lambda k: (datasets.index(k[0]), k[2], _source_key(k[1]))):
        by_seed = groups[key]
        seeds = sorted(by_seed)
        values = [float(by_seed[s]["test_acc"]) for s in seeds]
        mean, ci = t_interval(values)
        sizes = [by_seed[s].get("n_train") for s in seeds]
        n_train = sizes[0] if len(set(sizes)) == 1 else float(np.mean(sizes))
        rows.append({"dataset": key[0], "source": key[1], "fraction": key[2], "n_seeds": len(seeds), "seeds": seeds,
                     "mean": mean, "ci95": ci, "values": values, "n_train": n_train})
    return rows


def _pct(mean: float, ci: float) -> str:
    return f"{100 * mean:.1f}" if math.isnan(ci) else f"{100 * mean:.1f} ± {100 * ci:.1f}"


def _probe_at(refs: dict, fraction: float) -> list[float]:
    probe = refs.get("probe", {})
    return probe.get(fraction, probe.get(str(fraction), []))


def _lead(rows: list[dict]) -> str:
    """Which source leads at this fraction, and whether its interval overlaps the runner-up's."""
    ranked = sorted(rows, key=lambda r: -r["mean"])
    if len(ranked) < 2:
        return f"{ranked[0]['source']} only"
    a, b = ranked[0], ranked[1]
    gap = 100 * (a["mean"] - b["mean"])
    if math.isnan(a["ci95"]) or math.isnan(b["ci95"]):
        overlap = "one seed: no intervals"
    else:
        apart = a["mean"] - a["ci95"] > b["mean"] + b["ci95"]
        overlap = "CIs apart" if apart else "CIs overlap"
    return f"{a['source']} leads {b['source']} by {gap:.1f} pts ({overlap})"


def markdown(summary: list[dict], refs: dict) -> str:
    """Per dataset: a table of mean ± 95% CI (percent) by train fraction and label source."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        rows = [r for r in summary if r["dataset"] == dataset]
        ref = refs.get(dataset, {})
        sources = sorted({r["source"] for r in rows}, key=_source_key)
        out += [f"### {dataset}", ""]
        if "teacher" in ref:
            out += [f"Teacher logits {100 * ref['teacher']:.1f}%, chance {100 * ref.get('chance', float('nan')):.1f}% "
                    "(test). Student test accuracy, mean ± 95% CI over seeds; questions: the labelled train questions "
                    "(probe_pseudo also trains on the rest, labelled by the probe):", ""]
        out.append("| train fraction | questions | " + " | ".join(sources) + " | best probe |")
        out.append("|---" * (len(sources) + 3) + "|")
        leads = []
        for fraction in sorted({r["fraction"] for r in rows}):
            at = {r["source"]: r for r in rows if r["fraction"] == fraction}
            size = next(iter(at.values()))["n_train"] if "gold" not in at else at["gold"]["n_train"]
            cells = [_pct(at[s]["mean"], at[s]["ci95"]) if s in at else "—" for s in sources]
            probe = _probe_at(ref, fraction)
            cells.append(_pct(*t_interval(probe)) if probe else "—")
            out.append(f"| {100 * fraction:g}% | {size} | " + " | ".join(cells) + " |")
            leads.append(f"{100 * fraction:g}%: {_lead(list(at.values()))}")
        out += ["", "Leading source: " + "; ".join(leads) + ".", ""]
    return "\n".join(out).rstrip() + "\n"


def plot(summary: list[dict], refs: dict, out_dir: str | Path) -> dict[str, Path]:
    """One PNG per dataset: student accuracy against train fraction, per source, with references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, paths = Path(out_dir), {}
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        rows = [r for r in summary if r["dataset"] == dataset]
        ref = refs.get(dataset, {})
        fractions = sorted({r["fraction"] for r in rows})
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for k, source in enumerate(sorted({r["source"] for r in rows}, key=_source_key)):
            pts = sorted((r["fraction"], r["mean"], 0.0 if math.isnan(r["ci95"]) else r["ci95"])
                         for r in rows if r["source"] == source)
            x, y, e = (np.array(v) for v in zip(*pts, strict=True))
            x = x * 1.04 ** (k - 1.5)  # side by side, so the intervals stay readable
            ax.errorbar(x, 100 * y, yerr=100 * e, marker="o", capsize=3, label=f"student: {source}")
        probe = [(f, np.mean(_probe_at(ref, f))) for f in fractions if _probe_at(ref, f)]
        if probe:
            ax.plot([p[0] for p in probe], [100 * p[1] for p in probe], "k-.", marker="s", label="best probe")
        if "teacher" in ref:
            ax.axhline(100 * ref["teacher"], color="tab:red", linestyle="--", label="teacher logits")
        if "chance" in ref:
            ax.axhline(100 * ref["chance"], color="grey", linestyle=":", label="chance")
        ax.set_ylim(max(0.0, ax.get_ylim()[0]), min(100.0, ax.get_ylim()[1]))
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("train fraction")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: student accuracy by label source (mean ± 95% CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[dataset] = out_dir / f"bench_{dataset}.png"
        fig.savefig(paths[dataset], dpi=110)
        plt.close(fig)
    return paths
