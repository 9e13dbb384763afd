"""The benchmark's numbers: per-cell student accuracies over seeds and test questions, the paired
differences between label sources, and their tables and plots.

A cell is one trained student: {"dataset", "regime", "source", "fraction", "seed", "test_acc", "n_train", ...}
and its per-question correctness on the dataset's test questions (`correct[key(cell)]`, a bool array;
every student of a dataset scores the same test questions). Intervals come from
`engine.metrics.seeds_and_questions_bootstrap`: each draw resamples the seeds and the test questions
together, so an interval holds both the seed-to-seed spread and the finite test set. Differences are
paired: the same test questions, the same seeds. Pure numpy/scipy; matplotlib is imported only to plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.metrics import excludes_zero, paired_difference, seeds_and_questions_bootstrap

SOURCE_ORDER = ("gold", "logit", "probe", "gold+logit", "gold+probe", "logit_pseudo", "probe_pseudo")
PAIRS = (("probe", "logit"), ("probe", "gold"), ("gold+probe", "gold+logit"), ("gold+probe", "gold"),
         ("probe_pseudo", "logit_pseudo"), ("probe_pseudo", "gold"))
"""The differences reported, a - b, wherever both sources trained at a (dataset, regime, fraction)."""


def key(cell: dict) -> tuple:
    """A cell's identity in the matrix: (dataset, regime, source, fraction, seed)."""
    return (cell["dataset"], cell.get("regime", "full"), cell["source"], float(cell["fraction"]), int(cell["seed"]))


def _source_key(source: str) -> tuple[int, str]:
    return (SOURCE_ORDER.index(source), "") if source in SOURCE_ORDER else (len(SOURCE_ORDER), source)


def _groups(cells: list[dict]) -> tuple[dict[tuple, dict[int, dict]], list[str], list[str]]:
    """Cells by (dataset, regime, source, fraction) then seed; datasets and regimes in first-seen order
    (the matrix's regime before the slice's)."""
    groups: dict[tuple, dict[int, dict]] = {}
    datasets: list[str] = []
    regimes: list[str] = []
    for c in cells:
        k = key(c)
        if c["dataset"] not in datasets:
            datasets.append(c["dataset"])
        if k[1] not in regimes:
            regimes.append(k[1])
        seeds = groups.setdefault(k[:4], {})
        if k[4] in seeds:
            raise ValueError(f"summarise: cell {k} appears twice")
        seeds[k[4]] = c
    return groups, datasets, regimes


def summarise(cells: list[dict], correct: dict[tuple, np.ndarray], *, resamples: int = 2000) -> list[dict]:
    """One row per (dataset, regime, source, fraction): the seeds' accuracies, their mean, and the 95%
    interval over seeds and test questions (`lo`, `hi`)."""
    groups, datasets, regimes = _groups(cells)
    rows = []
    for k in sorted(groups, key=lambda k: (datasets.index(k[0]), regimes.index(k[1]), k[3], _source_key(k[2]))):
        by_seed = groups[k]
        seeds = sorted(by_seed)
        scores = np.stack([np.asarray(correct[(*k, s)], dtype=np.float64) for s in seeds])
        boot = seeds_and_questions_bootstrap(scores, n_boot=resamples)
        sizes = [by_seed[s].get("n_train") for s in seeds]
        rows.append({"dataset": k[0], "regime": k[1], "source": k[2], "fraction": k[3], "n_seeds": len(seeds),
                     "seeds": seeds, "values": [float(by_seed[s]["test_acc"]) for s in seeds],
                     "mean": boot["mean"], "lo": boot["lo"], "hi": boot["hi"], "n_test": boot["n_questions"],
                     "n_train": sizes[0] if len(set(sizes)) == 1 else float(np.mean(sizes))})
    return rows


def paired(cells: list[dict], correct: dict[tuple, np.ndarray], *, pairs: Sequence[tuple[str, str]] = PAIRS,
           resamples: int = 2000) -> list[dict]:
    """Each difference a - b of `pairs` per (dataset, regime, fraction) where both trained: per seed, the
    paired bootstrap over test questions (and McNemar's p); over the seeds they share, the interval over
    seeds and questions. `excludes_zero` marks a combined interval wholly on one side of zero."""
    groups, datasets, regimes = _groups(cells)
    out = []
    places = sorted({k[:2] + k[3:4] for k in groups}, key=lambda p: (datasets.index(p[0]), regimes.index(p[1]), p[2]))
    for dataset, regime, fraction in places:
        for a, b in pairs:
            ga, gb = groups.get((dataset, regime, a, fraction)), groups.get((dataset, regime, b, fraction))
            if not ga or not gb:
                continue
            seeds = sorted(set(ga) & set(gb))
            if not seeds:
                continue
            ca = {s: np.asarray(correct[(dataset, regime, a, fraction, s)], dtype=np.float64) for s in seeds}
            cb = {s: np.asarray(correct[(dataset, regime, b, fraction, s)], dtype=np.float64) for s in seeds}
            per_seed = [{"seed": s, **paired_difference(ca[s], cb[s], n_boot=resamples, seed=s)} for s in seeds]
            boot = seeds_and_questions_bootstrap(np.stack([ca[s] - cb[s] for s in seeds]), n_boot=resamples)
            out.append({"dataset": dataset, "regime": regime, "fraction": fraction, "a": a, "b": b,
                        "diff": boot["mean"], "lo": boot["lo"], "hi": boot["hi"], "n_seeds": len(seeds),
                        "excludes_zero": excludes_zero(boot["lo"], boot["hi"]), "per_seed": per_seed})
    return out


def _pct(row: dict) -> str:
    return f"{100 * row['mean']:.1f} [{100 * row['lo']:.1f}, {100 * row['hi']:.1f}]"


def _diff(row: dict) -> str:
    text = f"{100 * row['diff']:+.1f} [{100 * row['lo']:+.1f}, {100 * row['hi']:+.1f}]"
    return f"**{text}** ✱" if row["excludes_zero"] else text


def _probe_at(refs: dict, fraction: float) -> list[float]:
    probe = refs.get("probe", {})
    return probe.get(fraction, probe.get(str(fraction), []))


def verdict(row: dict) -> str:
    """One difference read from its interval, in words."""
    a, b, d = row["a"], row["b"], 100 * row["diff"]
    if not row["excludes_zero"]:
        return f"{a} and {b} are not told apart ({d:+.1f} pts, the interval holds 0)"
    return f"{a} {'beats' if d > 0 else 'trails'} {b} by {abs(d):.1f} pts (interval excludes 0)"


def markdown(summary: list[dict], pairs: list[dict], refs: dict) -> str:
    """Per dataset and regime: accuracy, mean [95% interval] in percent, by fraction and source; then the
    paired differences, bold with ✱ where the interval excludes zero."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        ref = refs.get(dataset, {})
        out += [f"### {dataset}", ""]
        if "teacher" in ref:
            out += [f"Teacher logits {100 * ref['teacher']:.1f}%, chance {100 * ref.get('chance', float('nan')):.1f}% "
                    f"({ref.get('n_test', '?')} test questions). Student test accuracy, mean over seeds "
                    "[95% interval over seeds and test questions]; questions: the labelled train questions "
                    "(the pseudo sources also train on the rest of the train split, the pool).", ""]
        for regime in dict.fromkeys(r["regime"] for r in summary if r["dataset"] == dataset):
            rows = [r for r in summary if r["dataset"] == dataset and r["regime"] == regime]
            sources = sorted({r["source"] for r in rows}, key=_source_key)
            seeds = sorted({n for r in rows for n in r["seeds"]})
            out += [f"**Student regime `{regime}`** ({len(seeds)} seeds)", ""]
            out.append("| train fraction | questions | " + " | ".join(sources) + " | best probe |")
            out.append("|---" * (len(sources) + 3) + "|")
            for fraction in sorted({r["fraction"] for r in rows}):
                at = {r["source"]: r for r in rows if r["fraction"] == fraction}
                size = at["gold"]["n_train"] if "gold" in at else next(iter(at.values()))["n_train"]
                cells = [_pct(at[s]) if s in at else "—" for s in sources]
                probe = _probe_at(ref, fraction)
                cells.append(f"{100 * float(np.mean(probe)):.1f}" if probe else "—")
                out.append(f"| {100 * fraction:g}% | {size} | " + " | ".join(cells) + " |")
            diffs = [p for p in pairs if p["dataset"] == dataset and p["regime"] == regime]
            if diffs:
                names = list(dict.fromkeys(f"{p['a']} − {p['b']}" for p in diffs))
                out += ["", "Paired differences, points (same test questions, same seeds):", "",
                        "| train fraction | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
                for fraction in sorted({p["fraction"] for p in diffs}):
                    at = {f"{p['a']} − {p['b']}": p for p in diffs if p["fraction"] == fraction}
                    out.append(f"| {100 * fraction:g}% | " + " | ".join(_diff(at[n]) if n in at else "—" for n in names)
                               + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def verdicts(pairs: list[dict], which: Sequence[tuple[str, str]] = (("probe", "logit"), ("probe", "gold"))) -> str:
    """The main differences per dataset, regime and fraction, in words (for README "What it shows")."""
    lines = []
    for p in pairs:
        if (p["a"], p["b"]) in which:
            lines.append(f"- {p['dataset']}, `{p['regime']}`, {100 * p['fraction']:g}%: {verdict(p)}.")
    return "\n".join(lines) + ("\n" if lines else "")


def plot(summary: list[dict], pairs: list[dict], refs: dict, out_dir: str | Path) -> dict[str, Path]:
    """Per dataset: bench_<dataset>.png, accuracy against train fraction for every source and regime,
    with interval bands; bench_<dataset>_diff.png, the paired differences with their bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, paths = Path(out_dir), {}
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        ref = refs.get(dataset, {})
        regimes = list(dict.fromkeys(r["regime"] for r in summary if r["dataset"] == dataset))
        fig, axes = plt.subplots(1, len(regimes), figsize=(6.4 * len(regimes), 4.4), squeeze=False, sharey=True)
        for ax, regime in zip(axes[0], regimes, strict=True):
            rows = [r for r in summary if r["dataset"] == dataset and r["regime"] == regime]
            fractions = sorted({r["fraction"] for r in rows})
            for source in sorted({r["source"] for r in rows}, key=_source_key):
                pts = sorted((r["fraction"], r["mean"], r["lo"], r["hi"]) for r in rows if r["source"] == source)
                x, y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
                line = ax.plot(x, 100 * y, marker="o", label=source)[0]
                ax.fill_between(x, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.15)
            probe = [(f, np.mean(_probe_at(ref, f))) for f in fractions if _probe_at(ref, f)]
            if probe:
                ax.plot([p[0] for p in probe], [100 * p[1] for p in probe], "k-.", marker="s", label="best probe")
            if "teacher" in ref:
                ax.axhline(100 * ref["teacher"], color="tab:red", linestyle="--", label="teacher logits")
            if "chance" in ref:
                ax.axhline(100 * ref["chance"], color="grey", linestyle=":", label="chance")
            _fraction_axis(ax, fractions)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{dataset}, student regime '{regime}'")
            ax.legend(fontsize=7)
        fig.suptitle("mean over seeds, band: 95% interval over seeds and test questions", fontsize=9)
        fig.tight_layout()
        paths[dataset] = out_dir / f"bench_{dataset}.png"
        fig.savefig(paths[dataset], dpi=110)
        plt.close(fig)

        diffs = [p for p in pairs if p["dataset"] == dataset]
        if not diffs:
            continue
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        styles = {regime: style for regime, style in zip(regimes, ("-", "--", ":", "-."), strict=False)}
        for (a, b, regime) in dict.fromkeys((p["a"], p["b"], p["regime"]) for p in diffs):
            pts = sorted((p["fraction"], p["diff"], p["lo"], p["hi"]) for p in diffs
                         if (p["a"], p["b"], p["regime"]) == (a, b, regime))
            x, y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
            line = ax.plot(x, 100 * y, marker="o", linestyle=styles.get(regime, "-"), label=f"{a} − {b} ({regime})")[0]
            ax.fill_between(x, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.12)
        ax.axhline(0.0, color="black", linewidth=0.8)
        _fraction_axis(ax, sorted({p["fraction"] for p in diffs}))
        ax.set_ylabel("difference (points)")
        ax.set_title(f"{dataset}: paired differences (95% interval over seeds and test questions)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[f"{dataset}_diff"] = out_dir / f"bench_{dataset}_diff.png"
        fig.savefig(paths[f"{dataset}_diff"], dpi=110)
        plt.close(fig)
    return paths


def _fraction_axis(ax, fractions: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("train fraction")
