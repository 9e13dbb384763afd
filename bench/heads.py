"""Head regime: questions per step and learning rate, on the cached frozen features of ARC-Easy.

    .venv/bin/python bench/heads.py       # after `distill bench configs/bench.yaml` made runs/bench/arc_easy
                                          # prints, writes bench/results/heads.json

Trains the gold-label head of the bench's ARC-Easy cell (seed 0) on the cached all-MiniLM-L6-v2
features for 60 epochs, keeping the best epoch on validation, at 100% and 5% of the train split, with
(questions per step, lr) in {(8, 3e-3), (64, 3e-3), (64, 1e-2), (256, 1e-2)}: wall time and test
accuracy. This sized `student.head_batch_size` and `student.head_lr`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch

from cluster import pipeline
from cluster.bench import cell_config, dataset_config
from engine import labels
from engine import student as st
from engine.config import load
from engine.hardware import matmul_flags
from engine.metrics import accuracy
from engine.tasks import stratified_subset

OUT = Path(__file__).parent / "results" / "heads.json"
SETTINGS = ((8, 3e-3), (64, 3e-3), (64, 1e-2), (256, 1e-2))


def main() -> None:
    torch.set_num_threads(2)
    cfg = load("configs/bench.yaml")
    run = pipeline.Run(cell_config(dataset_config(cfg, "arc_easy"), 0, 1.0))
    seqs = run.student_seqs
    where = Path(run.cfg.out_dir) / "student_features"
    feats = {r: np.load(glob.glob(str(where / f"{r}-*.npy"))[0]) for r in ("train", "validation", "test")}
    train, val, test = seqs["train"], seqs["validation"], seqs["test"]
    targets = labels.gold_targets(train.answer, train.n_choices)
    rows = []
    for fraction in (1.0, 0.05):
        questions = stratified_subset(train.answer, fraction, 0)
        for batch, lr in SETTINGS:
            s = dataclasses.replace(run.cfg.student, head_batch_size=batch, head_lr=lr, dtype="float32")
            torch.manual_seed(0)
            model = st.build_student(run.student_path, s, max_choices=4)
            st.set_trainable(model, "head", 0)
            opt = st.make_optimizer(model, lr, s.weight_decay)
            sched = st.make_scheduler(opt, -(-len(questions) // batch) * s.head_epochs, start_step=0)
            t0, history, best = time.perf_counter(), [], None
            for epoch in range(s.head_epochs):
                batches = st.make_batches(train, targets, questions, batch, 0, rng=np.random.default_rng([0, epoch]),
                                          features=feats["train"])
                st.train_epoch(model, batches, opt, sched, soft=True, temperature=1.0, alpha=1.0)
                p = st.predict(model, val, batch_size=256, pad_id=0, features=feats["validation"])
                history.append({"epoch": epoch + 1, "val_acc": accuracy(p, val.answer), "val_loss": 0.0})
                if st.best_epoch(history) == epoch + 1:
                    best = {k: v.clone() for k, v in model.head.state_dict().items()}
            model.head.load_state_dict(best)
            acc = accuracy(st.predict(model, test, batch_size=256, pad_id=0, features=feats["test"]), test.answer)
            rows.append({"fraction": fraction, "questions": int(len(questions)), "head_batch_size": batch, "head_lr": lr,
                         "seconds": round(time.perf_counter() - t0, 1), "best_epoch": st.best_epoch(history),
                         "test_acc": round(acc, 4)})
            print(rows[-1], flush=True)
    OUT.write_text(json.dumps({"command": "python bench/heads.py", "rows": rows,
                               "machine": {"cpu_flags": matmul_flags()}}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
