"""A student checkpoint's write: safetensors' `save_file` against `engine.tensorfile` (past the page cache).

    .venv/bin/python bench/tensorfile.py       # prints, writes bench/results/tensorfile.json

What the training loop waits for at the end of every epoch under Ray Train: the default student's
checkpoint (all-MiniLM-L6-v2 fully fine-tuned: its trainable weights and its AdamW state after a few
real steps, the unused embedding rows left out as `engine.fit.optimizer_state` does), written into a
new folder under `--dir` (default: the system temp folder) by each writer in turn, `--repeats` times.
Between two writes the script waits `--pause` seconds, as the loop does between two epochs: on a VM that
hands freed memory back to its host (free-page reporting), the page cache's fresh pages then cost what
they cost the training run. The files of both writers are compared byte for byte.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from engine import fit, labels
from engine import student as st
from engine.config import load
from engine.hardware import matmul_flags
from engine.models import resolve_model
from engine.tasks import load_role
from engine.tensorfile import write_safetensors

OUT = Path(__file__).parent / "results" / "tensorfile.json"
WRITERS = {"save_file": lambda t, p: save_file(t, str(p)), "tensorfile": write_safetensors}


def checkpoint_tensors(config: str, steps: int) -> dict[str, dict]:
    """The default student's trainable weights and AdamW state after `steps` training steps."""
    cfg = load(config, ["student.finetune=full", "student.lr=3e-5"])  # the whole student, as its committed reading
    s = cfg.student
    torch.set_num_threads(s.cpus_per_worker)
    path = st.resolve_student_path(s, resolve_model(cfg.teacher))
    tok, spec = st.student_inputs(s, path, cfg.prompt.answer_format)
    train = st.encode_examples(load_role(cfg.data, "train")[: steps * s.train_batch_size], tok, spec)
    batches = st.make_batches(train, labels.gold_targets(train.answer, train.n_choices), np.arange(train.n_questions),
                              s.train_batch_size, tok.pad_token_id, rng=np.random.default_rng(0), gold=train.answer)
    torch.manual_seed(0)
    model = st.build_student(path, s, max_choices=train.max_choices, answer_format=spec.answer_format, tokenizer=tok)
    names = st.set_trainable(model, s.finetune, s.top_blocks)
    opt = st.make_optimizer(model, s.train_lr, s.weight_decay)
    st.train_epoch(model, batches, opt, st.make_scheduler(opt, len(batches), start_step=0), dtype="float32",
                   soft=s.soft, temperature=s.temperature, alpha=1.0)
    return {"trainable": fit.trainable_state(model, names), "optimizer": fit.optimizer_state(opt)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pause", type=float, default=8.0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    files = checkpoint_tensors(args.config, args.steps)
    nbytes = sum(t.numel() * t.element_size() for f in files.values() for t in f.values())
    times: dict[str, list[float]] = {w: [] for w in WRITERS}
    same = True
    for i in range(args.repeats):
        dirs = {}
        for name, write in WRITERS.items():
            time.sleep(args.pause)
            d = Path(tempfile.mkdtemp(prefix=f"bench-tensorfile-{name}-", dir=args.dir))
            t0 = time.perf_counter()
            for f, tensors in files.items():
                write(tensors, d / f"{f}.safetensors")
            times[name].append(round(time.perf_counter() - t0, 3))
            dirs[name] = d
        same &= all((dirs["save_file"] / f"{f}.safetensors").read_bytes() == (dirs["tensorfile"] / f"{f}.safetensors")
                    .read_bytes() for f in files)
        for d in dirs.values():
            shutil.rmtree(d)
        print(f"[{i + 1}/{args.repeats}] " + ", ".join(f"{w} {times[w][-1]} s" for w in WRITERS), flush=True)
    fs = subprocess.run(["df", "-T", str(args.dir)], capture_output=True, text=True).stdout.splitlines()[-1:]
    med = {w: round(float(np.median(v)), 3) for w, v in times.items()}
    results = {
        "command": "python bench/tensorfile.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
        "bytes": nbytes, "files": {f: len(t) for f, t in files.items()}, "seconds": times, "median_seconds": med,
        "speedup": round(med["save_file"] / med["tensorfile"], 2), "same_bytes": bool(same),
        "filesystem": fs[0].split()[1] if fs else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": matmul_flags()},
        "versions": {k: md.version(k) for k in ("torch", "safetensors")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{nbytes / 1e6:.0f} MB: save_file {med['save_file']} s, tensorfile {med['tensorfile']} s "
          f"({results['speedup']}x); same bytes: {same}; wrote {args.out}")


if __name__ == "__main__":
    main()
