"""The plain student loop alone, no Ray: does the Ray Train worker's environment or thread make its
first epoch dearer?

    .venv/bin/python bench/student_plain_variants.py plain,rayenv,rayenv_thread 2   # variants, rounds

Runs `bench/student.py`'s `plain()` (the default's student, 400 train questions, 3 epochs, gold labels)
in a new spawned process per run, 10 s after the previous one ended, in rounds of the given variants:
  plain:         as `bench/student.py` runs it;
  rayenv:        with a Ray Train CPU worker's environment (`cluster.train.train_worker_env(False)`:
                 OpenMP, one malloc arena, freed memory kept) set before the spawn;
  rayenv_thread: the same, with the loop in a second thread, as Ray Train runs it.
Prints each run's per-epoch training wall and kernel seconds, page faults (thousands) and peak resident
MiB, and writes them to /tmp/student_plain_variants.json (the committed reading is
`bench/results/student_xeon/settle_readings.json`, `plain_only_variants`).
"""

import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import student as B  # noqa: E402  (bench/student.py)

from cluster.train import StudentJob, train_worker_env  # noqa: E402
from engine import labels  # noqa: E402
from engine import student as st  # noqa: E402
from engine.config import load  # noqa: E402
from engine.models import resolve_model  # noqa: E402
from engine.tasks import load_role  # noqa: E402


def in_thread(*a):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", B.plain(*a)))
    t.start()
    t.join()
    return box["r"]


def main() -> None:
    cfg = load("configs/default.yaml", ["student.epochs=3", "student.num_workers=1", "student.label_sources=[gold]",
                                         "student.finetune=full", "student.lr=3e-5"])
    model_path = st.resolve_student_path(cfg.student, resolve_model(cfg.teacher))
    tok, spec = st.student_inputs(cfg.student, model_path, cfg.prompt.answer_format)
    ex = {"train": load_role(cfg.data, "train")[:400], "validation": load_role(cfg.data, "validation"),
          "test": load_role(cfg.data, "test")[:300]}
    splits = {r: st.encode_examples(e, tok, spec) for r, e in ex.items()}
    train = splits["train"]
    job = StudentJob("gold", cfg.seed, np.arange(train.n_questions), labels.gold_targets(train.answer, train.n_choices),
                     train.answer)
    variants, rounds = sys.argv[1].split(","), int(sys.argv[2])
    out = []
    for rep in range(rounds):
        for v in variants:
            env_over = train_worker_env(False) if "rayenv" in v else {}
            saved = {k: os.environ.get(k) for k in env_over}
            os.environ.update(env_over)
            time.sleep(10)
            fn = in_thread if "thread" in v else B.plain
            with mp.get_context("spawn").Pool(1) as pool:
                r = pool.apply(fn, (cfg, model_path, splits, spec, job, tok.pad_token_id, tempfile.mkdtemp()))
            for k, val in saved.items():
                if val is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = val
            c = r["cpu"]
            print(v, rep, "wall", [round(x, 1) for x in c["seconds"]], "sys", [round(x, 1) for x in c["cpu_system_seconds"]],
                  "pf", [int(x / 1000) for x in c["page_faults"]], "rss", c["peak_rss_mib"], flush=True)
            out.append({"variant": v, "repeat": rep, "cpu": c})
    Path("/tmp/student_plain_variants.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
