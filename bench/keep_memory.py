"""What `cluster.runtime.compute_env` (one malloc arena, freed memory kept) buys the CPU stages.

    .venv/bin/python bench/keep_memory.py      # prints, writes bench/results/keep_memory.json

Two stages of the default (`configs/default.yaml`), each timed with and without the settings, the two
alternating `--repeats` times so that drift hits both alike:
  extract:  the teacher's forward (`engine.teacher.forward_rows`, all layers and scores, per-choice) over
            `--questions` train questions, in a new process whose environment is `compute_env(gpu=False)`
            or glibc's defaults, in a thread other than the main one, as a Ray actor's methods run;
  baseline: the vLLM scorer (`cluster.baseline.VLLMScorer`, as `distill baseline` starts it) scoring the
            per-choice rows of `--baseline-questions` test questions, in a Ray actor started with
            `compute_env(gpu=False, one_arena=False)` (what `start_scorer` gives it) or with nothing.
Each run reports real tokens/s and, for extract, the kernel seconds and page faults of its forward.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cluster import runtime  # noqa: E402  (sets Ray's environment before ray is imported)
from engine.config import load  # noqa: E402
from engine.hardware import free_page_reporting, matmul_flags, resolve  # noqa: E402

OUT = Path(__file__).parent / "results" / "keep_memory.json"

FORWARD = """
import json, resource, sys, threading, time
sys.path.insert(0, {repo!r})
import numpy as np, torch
from engine.config import load
from engine.hardware import resolve
from engine.models import load_causal_lm, load_tokenizer, resolve_model
from engine.sequences import build_sequences
from engine.tasks import load_role
from engine.teacher import forward_rows
cfg = resolve(load({config!r}))[0]
torch.set_num_threads(cfg.extract.cpus_per_replica)
path = resolve_model(cfg.teacher)
model, tok = load_causal_lm(path, cfg.teacher.dtype), load_tokenizer(path)
seqs = build_sequences(load_role(cfg.data, "train")[:{questions}], tok, cfg.prompt)
layers = list(range(1, model.config.num_hidden_layers + 1))
def run():
    return forward_rows(model, seqs, np.arange(seqs.n_rows), layers, pool=cfg.prompt.pool, pad_id=tok.pad_token_id,
                        batch_size=cfg.extract.batch_size, scores=True)
out = {{}}
def timed():
    run()  # warm-up: kernels chosen, the model's pages touched
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(seconds=time.perf_counter() - t, system_seconds=r1.ru_stime - r0.ru_stime,
               page_faults=r1.ru_minflt - r0.ru_minflt, real_tokens=int(seqs.lengths().sum()))
th = threading.Thread(target=timed); th.start(); th.join()
print(json.dumps(out))
"""


def extract_run(config: str, questions: int, kept: bool) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = {**base, **(runtime.compute_env(False) if kept else {})}
    code = FORWARD.format(repo=str(REPO), config=config, questions=questions)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"kept": kept, "real_tokens_per_s": round(r["real_tokens"] / r["seconds"], 1),
            "seconds": round(r["seconds"], 2), "system_seconds": round(r["system_seconds"], 2),
            "page_faults": r["page_faults"]}


def baseline_run(cfg, questions: int, kept: bool) -> dict:
    import ray

    from cluster.baseline import VLLMScorer, build_pairs, model_len_for
    from engine.models import load_tokenizer, resolve_model
    from engine.sequences import build_sequences
    from engine.tasks import load_role

    path = resolve_model(cfg.teacher)
    seqs = build_sequences(load_role(cfg.data, "test")[:questions], load_tokenizer(path), cfg.prompt)
    env = runtime.compute_env(False, one_arena=False) if kept else {}
    actor = (ray.remote(VLLMScorer).options(num_cpus=cfg.ray.num_cpus, runtime_env={"env_vars": env})
             .remote(str(path), cfg.baseline, model_len_for(seqs)))
    try:
        ray.get(actor.ready.remote())
        pairs = build_pairs(seqs)
        t = time.perf_counter()
        ray.get(actor.score.remote(pairs))
        seconds = time.perf_counter() - t
        got = ray.get(actor.malloc.remote())
    finally:
        ray.kill(actor)
    assert got == env, (got, env)
    time.sleep(2)  # its CPUs back before the next actor asks for them
    return {"kept": kept, "real_tokens_per_s": round(int(seqs.lengths().sum()) / seconds, 1), "seconds": round(seconds, 2)}


def summary(runs: list[dict]) -> dict:
    return {side: float(np.median([r["real_tokens_per_s"] for r in runs if r["kept"] == (side == "kept")]))
            for side in ("kept", "default")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/default.yaml"))
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--baseline-questions", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = resolve(load(args.config))[0]
    extract, baseline = [], []
    for i in range(args.repeats):
        for kept in (i % 2 == 0, i % 2 == 1):
            extract.append(extract_run(args.config, args.questions, kept))
            print("extract", extract[-1], flush=True)
    runtime.init(cfg.ray)
    try:
        for i in range(args.repeats):
            for kept in (i % 2 == 0, i % 2 == 1):
                baseline.append(baseline_run(cfg, args.baseline_questions, kept))
                print("baseline", baseline[-1], flush=True)
    finally:
        runtime.shutdown()
    results = {
        "command": " ".join(["python", "bench/keep_memory.py", *sys.argv[1:]]), "config": args.config,
        "dtype": cfg.teacher.dtype, "settings": runtime.compute_env(False),
        "extract": {"questions": args.questions, "median_tokens_per_s": summary(extract), "runs": extract},
        "baseline": {"questions": args.baseline_questions, "median_tokens_per_s": summary(baseline), "runs": baseline},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": matmul_flags(),
                    "free_page_reporting": free_page_reporting()},
        "versions": {k: md.version(k) for k in ("torch", "transformers", "ray")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for stage in ("extract", "baseline"):
        m = results[stage]["median_tokens_per_s"]
        print(f"{stage}: median {m['kept']} real tokens/s with the settings, {m['default']} without")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
