"""What a new process's memory costs here, by how long ago the memory it gets was freed.

    .venv/bin/python bench/memory_state.py      # prints, writes bench/results/memory_state.json

A VM guest with free page reporting (virtio-balloon; `engine.hardware.free_page_reporting`) hands
memory that has stayed free for a moment back to its host, and the first write to it afterwards waits
on the host. So on such a machine a timed stage that starts a process (a Ray worker, a spawned loop)
pays for its memory according to what ran before it and how long ago. This bench shows how much:
process A touches `--gib` GiB and exits; after a delay, process B touches as much and reports the wall
time and kernel CPU time it took. Each delay is tried `--repeats` times, in a shuffled order.

`bench/student.py --settle` is sized from this: it waits before each side it times, so that both start
from memory handed back to the host, whichever ran before.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.hardware import free_page_reporting, matmul_flags  # noqa: E402

OUT = Path(__file__).parent / "results" / "memory_state.json"

TOUCH = """
import resource, sys, time
import numpy as np
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
a = np.ones(int(float(sys.argv[1]) * (1 << 27)))  # GiB of float64, every page written
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime)
"""


def touch(gib: float) -> tuple[float, float]:
    """(wall, kernel CPU) seconds a new process takes to write `gib` GiB of fresh memory."""
    out = subprocess.run([sys.executable, "-c", TOUCH, str(gib)], capture_output=True, text=True, check=True)
    wall, system = map(float, out.stdout.split())
    return wall, system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--delays", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0, 15.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    trials = [d for d in args.delays for _ in range(args.repeats)]
    random.Random(args.seed).shuffle(trials)
    seen: dict[float, list] = {d: [] for d in args.delays}
    for d in trials:
        touch(args.gib)  # A: its memory is freed when it exits
        time.sleep(d)
        wall, system = touch(args.gib)  # B
        seen[d].append({"wall_seconds": round(wall, 3), "system_seconds": round(system, 3)})
        print(f"after {d:>4} s: {args.gib} GiB written in {wall:.2f} s ({system:.2f} s in the kernel)", flush=True)
    rows = [{"delay_seconds": d, "median_wall_seconds_per_gib": round(float(np.median([r["wall_seconds"] for r in runs])) / args.gib, 3),
             "runs": runs} for d, runs in seen.items()]
    results = {
        "command": " ".join(["python", "bench/memory_state.py", *sys.argv[1:]]), "gib": args.gib,
        "free_page_reporting": free_page_reporting(), "by_delay": rows,
        "machine": {"platform": platform.platform(), "cpu_flags": matmul_flags()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for r in rows:
        print(f"delay {r['delay_seconds']:>4} s: median {r['median_wall_seconds_per_gib']} s per GiB")
    print(f"free page reporting: {results['free_page_reporting']}; wrote {args.out}")


if __name__ == "__main__":
    main()
