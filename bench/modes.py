"""Issue 4's comparison, both prompt modes on ARC-Easy and ARC-Challenge: one table from four runs.

    for c in arc_easy_letter arc_challenge arc_challenge_letter default; do
        .venv/bin/distill run configs/$c.yaml; done                      # about an hour on 2 cores
    .venv/bin/python bench/modes.py      # copies each report to bench/results/<run>/, writes modes.{json,md}

`configs/default.yaml` no longer asks the brittleness table (a per-choice run never reads the letter
prompts); its row's spread needs `baseline.formats='[" {letter}", "{letter}", "({letter})",
"{number}."]' baseline.permutations=3` on its run. The committed `modes.md` was made before that
change, when the default asked it.

Per run: the teacher's letter/choice-logit accuracy on test, the best probe (chosen on validation) on
test, the best single layer, the spread of teacher and probe accuracy across answer formats and
choice orders (the brittleness table), and the out-of-fold soft labels' ECE before and after
temperature scaling. Every number is read from the run's report.json; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engine.config import load

RESULTS = Path(__file__).parent / "results"
RUNS = ("default", "arc_easy_letter", "arc_challenge", "arc_challenge_letter")


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def row(report: dict) -> dict:
    p, b = report["probes"], (report.get("vllm_baseline") or {}).get("brittleness") or {}
    single = max(p["per_layer"], key=lambda e: (e["val_acc"], -e["layer"]))
    spread = b.get("spread") or {}
    return {
        "dataset": report["dataset"], "mode": report["mode"],
        "teacher_acc": report["teacher_logit"]["test_acc"], "teacher_acc_norm": report["teacher_logit"].get("test_acc_norm"),
        "best_probe": p["best"], "best_single_layer": {k: single[k] for k in ("layer", "family", "val_acc", "test_acc")
                                                        if k in single},
        "last_layer_probe_test_acc": p["per_layer"][-1]["test_acc"],
        "chance": report.get("chance"),
        "brittleness_questions": b.get("n_questions"),
        "teacher_format_spread": (spread.get("teacher") or {}).get("range"),
        "probe_format_spread": (spread.get("probe") or {}).get("range"),
        "ece_raw": p.get("ece_raw"), "ece_calibrated": p.get("ece_calibrated"), "temperature": p.get("temperature"),
    }


def markdown(rows: list[dict]) -> str:
    head = ["dataset", "mode", "teacher logits", "best probe (validation's pick)", "best single layer",
            "last layer", "teacher letter logits: spread over formats/orders", "probe: same spread", "ECE raw → calibrated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bp, bs = r["best_probe"], r["best_single_layer"]
        name = f"layers {'+'.join(map(str, bp['layers']))} ({bp.get('combine')})" if bp.get("layer") is None \
            else f"layer {bp['layer']}"
        teacher = pct(r["teacher_acc"]) + (f" ({pct(r['teacher_acc_norm'])} norm.)" if r["teacher_acc_norm"] else "")
        lines.append("| " + " | ".join([
            r["dataset"], r["mode"], teacher, f"{pct(bp['test_acc'])} ({bp.get('family', '')}, {name})",
            f"{pct(bs['test_acc'])} (layer {bs['layer']})", pct(r["last_layer_probe_test_acc"]),
            pct(r["teacher_format_spread"]), pct(r["probe_format_spread"]),
            f"{pct(r['ece_raw'])} → {pct(r['ece_calibrated'])}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    args = ap.parse_args()
    rows = []
    for name in args.runs:
        cfg = load(f"configs/{name}.yaml")
        out = Path(cfg.out_dir)
        report = json.loads((out / "report.json").read_text())
        dest = RESULTS / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("report.json", "report.md", "probe_accuracy.png"):
            shutil.copyfile(out / f, dest / f)
        rows.append({"run": name, "config": f"configs/{name}.yaml", **row(report)})
    (RESULTS / "modes.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    (RESULTS / "modes.md").write_text("# Both prompt modes on ARC-Easy and ARC-Challenge (test)\n\n"
                                      "Written by `python bench/modes.py` from each run's report.json.\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
