"""The matmul work a config's extraction and students must do, and the least time it can take.

    .venv/bin/python bench/flop_floor.py                       # configs/default.yaml, prints and writes
    .venv/bin/python bench/flop_floor.py --gflops 72.4 213      # the GEMM rates to divide by
    .venv/bin/python bench/flop_floor.py configs/default.yaml student.finetune=full   # key=value overrides

Counts, on the config's own sampled splits (`engine.tasks.load_role`):
  - the teacher's packed tokens (`engine.teacher.pack_units`: a question's shared prefix once), each
    costing `engine.hardware.forward_flops_per_token` (2 per block weight, plus attention);
  - the student's tokens (`engine.student_data.encode_examples`, its own tokenizer), each costing 2 per
    weight of its transformer blocks plus attention in a forward, 3 times that to train (forward and
    backward); per student: `student.epochs` epochs of training and of validation, then one test pass.
    Under `student.finetune: top` the frozen blocks below the `top_blocks` run once per split for all
    students (their token states are cached), and training, validation and test run the top blocks only.
Embeddings, the vocabulary projection, the vLLM baseline and the probes are left out, so the figure is
a floor: the time this work takes at 100% of each GEMM rate given. Nothing is timed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import load  # noqa: E402
from engine.hardware import forward_flops_per_token  # noqa: E402
from engine.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.student import resolve_student_path  # noqa: E402
from engine.student_data import InputSpec, encode_examples  # noqa: E402
from engine.tasks import load_role  # noqa: E402
from engine.teacher import pack_units  # noqa: E402

OUT = Path(__file__).parent / "results" / "flop_floor.json"
ROLES = ("train", "validation", "test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. student.finetune=full")
    ap.add_argument("--gflops", type=float, nargs="+", default=[72.4],
                    help="GEMM rates (GFLOP/s) to divide by; 72.4: the AVX2-only machine (bench/results/cpu_budget.json)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = load(args.config if Path(args.config).exists() else REPO / args.config, args.overrides)
    if cfg.student.finetune not in ("full", "top"):
        raise SystemExit(f"student.finetune: {cfg.student.finetune!r}; this count is for 'full' or 'top'")
    examples = {role: load_role(cfg.data, role) for role in ROLES}

    teacher_path = resolve_model(cfg.teacher)
    teacher, ttok = load_causal_lm(teacher_path, "float32"), load_tokenizer(teacher_path)
    t_tokens, t_flops = {}, 0.0
    for role, ex in examples.items():
        seqs = build_sequences(ex, ttok, cfg.prompt)
        t_tokens[role] = int(sum(len(u.tokens) for u in pack_units(seqs, np.arange(seqs.n_rows))))
        per = forward_flops_per_token(teacher, 0.5 * float(seqs.lengths().mean()))
        t_flops += per * t_tokens[role]

    from transformers import AutoModel, AutoTokenizer

    spath = resolve_student_path(cfg.student, teacher_path)
    stok, smodel = AutoTokenizer.from_pretrained(spath), AutoModel.from_pretrained(spath, use_safetensors=True)
    if getattr(smodel.config, "is_decoder", False):
        raise SystemExit("student: this count is for an encoder student (the default's)")
    block_weights = sum(p.numel() for n, p in smodel.named_parameters() if ".layer." in n and p.dim() == 2)
    spec = InputSpec(kind="encoder", mode=cfg.student.mode, max_length=cfg.student.max_length)
    s_tokens, s_fwd = {}, {}
    for role, ex in examples.items():
        lengths = np.asarray([len(x) for x in encode_examples(ex, stok, spec).ids], dtype=np.float64)
        s_tokens[role] = int(lengths.sum())
        # attention: QK^T and AV over the whole row (bidirectional), 2 * 2 * length * hidden per layer
        attn = 4.0 * float((lengths ** 2).sum()) * smodel.config.hidden_size * smodel.config.num_hidden_layers
        s_fwd[role] = 2.0 * block_weights * s_tokens[role] + attn
    n_students, epochs = len(cfg.student.label_sources), cfg.student.epochs
    top = cfg.student.top_blocks / smodel.config.num_hidden_layers if cfg.student.finetune == "top" else 1.0
    parts = {
        "teacher_extraction": t_flops,
        "students_train": n_students * epochs * 3.0 * top * s_fwd["train"],
        "students_validation": n_students * epochs * top * s_fwd["validation"],
        "students_test": n_students * top * s_fwd["test"],
    }
    if top < 1.0:  # the frozen bottom, once per split for every student
        parts["students_frozen_bottom_once"] = (1.0 - top) * sum(s_fwd.values())
    total = sum(parts.values())
    floors = {str(g): round(total / (g * 1e9) / 60.0, 2) for g in args.gflops}
    result = {
        "command": " ".join(["python", "bench/flop_floor.py", *sys.argv[1:]]),
        "config": args.config, "overrides": args.overrides, "finetune": cfg.student.finetune,
        "top_blocks": cfg.student.top_blocks if top < 1.0 else None, "questions": {r: len(e) for r, e in examples.items()},
        "teacher_packed_tokens": t_tokens, "student_tokens": s_tokens,
        "student_block_weights": block_weights, "students": n_students, "epochs": epochs,
        "tflop": {k: round(v / 1e12, 2) for k, v in parts.items()} | {"total": round(total / 1e12, 2)},
        "minutes_at_100pct_of_gflops": floors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("teacher_packed_tokens", "student_tokens", "tflop")}, indent=1))
    for g, minutes in floors.items():
        print(f"at 100% of {g} GFLOP/s: {minutes} min (extraction and students only)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
