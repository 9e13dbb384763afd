"""Small torch ops in a second Python thread, with and without an OpenMP pool in the main thread.

    .venv/bin/python bench/omp_threads.py      # prints, writes bench/results/omp_threads.json

Ray Train runs the training loop in a thread of the worker process. Each case runs in a fresh
interpreter, 3 x 3000 (gelu(x + 1)).sum() on a (32, 40, 384) tensor with 2 threads: in the main thread;
in a second thread when the main thread never ran torch; in a second thread after the main thread ran
the same ops (its own OpenMP pool); and that last case with OMP_NUM_THREADS=1 for the process and
torch.set_num_threads(2) in the second thread (what `cluster.train.TRAIN_WORKER_ENV` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.hardware import matmul_flags

OUT = Path(__file__).parent / "results" / "omp_threads.json"
CASE = r"""
import json, sys, threading, time, torch
x = torch.randn(32, 40, 384)
def ops(k=None):
    if k: torch.set_num_threads(k)
    t = time.perf_counter()
    for _ in range(3000): torch.nn.functional.gelu(x + 1.0).sum()
    return time.perf_counter() - t
where, main_first = sys.argv[1], sys.argv[2] == "1"
if main_first: [ops() for _ in range(3)]
if where == "main":
    out = [ops() for _ in range(3)]
else:
    r = {}
    t = threading.Thread(target=lambda: r.setdefault("t", [ops(2) for _ in range(3)])); t.start(); t.join()
    out = r["t"]
print(json.dumps(out))
"""


def case(where: str, main_first: bool, omp: str | None) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    out = subprocess.run([sys.executable, "-c", CASE, where, "1" if main_first else "0"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [round(v, 3) for v in json.loads(out.strip().splitlines()[-1])]


def main() -> None:
    res = {"main thread": case("main", False, None),
           "second thread, main never ran torch": case("thread", False, None),
           "second thread after the main thread's pool": case("thread", True, None),
           "same, OMP_NUM_THREADS=1 + set_num_threads(2) in the thread": case("thread", True, "1")}
    for k, v in res.items():
        print(f"{k}: {v} s")
    OUT.write_text(json.dumps({"command": "python bench/omp_threads.py", "seconds": res,
                               "machine": {"cpus": os.cpu_count(), "cpu_flags": matmul_flags()}}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
