"""How long a run would take on the AVX2-only machine, from a run timed here with that machine's kernels.

No AVX2-only machine is at hand, so the default's 20-minute budget there is checked by estimate: run
`distill run` on a newer CPU with its kernels held to AVX2 and every dtype float32, e.g.

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 /usr/bin/time -v \\
      .venv/bin/distill run configs/default.yaml out_dir=/tmp/avx2 \\
      teacher.dtype=float32 baseline.dtype=float32 student.dtype=float32

then scale each stage of its `report.json` `timings` by how much slower the AVX2-only machine was
measured to be at that kind of work:

* low end, every stage: the teacher forward's ratio (`bench/cpu_budget.py` on both machines:
  `teacher_forward_tokens_per_s` float32 here over there);
* high end: fp32 GEMM's ratio (`matmul_gflops` float32), the larger one, for the probes, the students
  and what lies outside the stages (start-up, writing the report); for the extraction and the baseline
  the larger of the forward's ratio and the ratio that machine's own run of those stages showed
  against a run here with the AVX2 kernels (`--stage-ratios`, default: 2026-11-24 there against
  2026-12-04 here, `bench/results/default/RUN.md`).

The result is an estimate, not a measurement there; it prints both ends and writes them with every
input to `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

STAGE_RATIOS = {"extract": 422.0 / 165.0, "baseline": 335.6 / 129.4}
"""That machine's own extraction and baseline (2026-11-24, report.json `timings`: 422.0 s and 335.6 s)
over the same stages, same config for them, run here with the AVX2 kernels on 2026-12-04 (165.0 s and
129.4 s; `bench/results/default/RUN.md`, "Previous record")."""


def ratios(there: dict, here: dict) -> dict[str, float]:
    """How many times slower `there` (cpu_budget.json of the AVX2-only machine) is than `here`."""
    return {"gemm": here["matmul_gflops"]["float32"] / there["matmul_gflops"]["float32"],
            "forward": here["teacher_forward_tokens_per_s"]["float32"] / there["teacher_forward_tokens_per_s"]["float32"]}


def estimate(timings: dict, wall: float, r: dict[str, float], stage_ratios: dict[str, float]) -> dict:
    """Seconds per stage on the AVX2-only machine, low and high, and their sums."""
    stages = {"extract": timings.get("extract", 0.0), "probes": timings.get("probes", 0.0),
              "baseline": timings.get("baseline", 0.0),
              "students": sum(v for k, v in timings.items() if k.startswith("student"))}
    stages["outside"] = max(0.0, wall - timings["total"])
    out = {}
    for name, seconds in stages.items():
        hi = max(r["forward"], stage_ratios[name]) if name in stage_ratios else max(r["gemm"], r["forward"])
        out[name] = {"here_s": round(seconds, 1), "low_s": round(seconds * r["forward"], 1), "high_s": round(seconds * hi, 1),
                     "ratios": [round(r["forward"], 3), round(hi, 3)]}
    low, high = sum(v["low_s"] for v in out.values()), sum(v["high_s"] for v in out.values())
    return {"stages": out, "here_wall_s": wall, "low_s": round(low, 1), "high_s": round(high, 1),
            "low_min": round(low / 60, 1), "high_min": round(high / 60, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report.json of a run made here with the AVX2 kernels and float32")
    ap.add_argument("--wall", type=float, required=True, help="that run's wall-clock seconds (/usr/bin/time)")
    ap.add_argument("--there", default=str(RESULTS / "cpu_budget.json"), help="cpu_budget.py on the AVX2-only machine")
    ap.add_argument("--here", default=str(RESULTS / "cpu_budget_avx2_kernels.json"),
                    help="cpu_budget.py here, under the same AVX2 kernel limits")
    ap.add_argument("--stage-ratios", default=json.dumps(STAGE_RATIOS), help="JSON {stage: measured ratio}")
    ap.add_argument("--budget-min", type=float, default=20.0)
    ap.add_argument("--out", help="write the estimate here (JSON)")
    args = ap.parse_args()

    report = json.loads(Path(args.report).read_text())
    there, here = json.loads(Path(args.there).read_text()), json.loads(Path(args.here).read_text())
    r = ratios(there, here)
    est = estimate(report["timings"], args.wall, r, json.loads(args.stage_ratios))
    res = {"command": "python bench/avx2_estimate.py " + " ".join(
               [args.report, f"--wall {args.wall:g}"] + ([f"--out {args.out}"] if args.out else [])),
           "report": args.report, "config_hash": report.get("config_hash"), "ratios": {k: round(v, 3) for k, v in r.items()},
           "stage_ratios": {k: round(v, 3) for k, v in json.loads(args.stage_ratios).items()},
           "there_machine": there.get("machine"), "here_machine": here.get("machine"), **est,
           "within_budget": {"budget_min": args.budget_min, "low": est["low_min"] <= args.budget_min,
                             "high": est["high_min"] <= args.budget_min}}
    for name, s in est["stages"].items():
        print(f"{name:9s} here {s['here_s']:7.1f} s -> {s['low_s']:7.1f} - {s['high_s']:7.1f} s (x{s['ratios'][0]} - x{s['ratios'][1]})")
    print(f"total     here {args.wall:7.1f} s -> {est['low_min']} - {est['high_min']} min on the AVX2-only machine "
          f"(budget {args.budget_min:g} min: {'within' if res['within_budget']['high'] else 'NOT within'} at the high end)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
