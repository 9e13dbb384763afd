"""Parity with lm-evaluation-harness: the same task, model and prompt scored by lm-eval and by the engine.

    python bench/lm_eval_parity.py [--venv /path/to/venv-with-lm-eval] [--n 1000] [--chat]

The task is the default's: its ARC-Easy test sample (`configs/default.yaml`, 1000 questions), written
to a JSONL file and described to lm-eval by a task YAML that mirrors the engine's per-choice prompt
(`Question: {question}\\nAnswer:` + ` {choice}`). lm-eval runs in its own interpreter (`--venv`: lm-eval
pins its own dependencies, so it is not one of the project's); the engine scores the same questions
with its teacher forward (`engine.teacher.forward_rows`, packed per-choice rows, fp32). Compared:
every choice's log-likelihood (max |diff|), acc (the engine's `normalise: none`) and acc_norm
(`normalise: bytes`), question by question. `--chat` repeats both with the teacher's chat template
(`prompt.chat_template: true` against lm-eval's `--apply_chat_template`). Writes `--out`
(bench/results/lm_eval_parity.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import hardware  # noqa: E402
from engine.config import load  # noqa: E402
from engine.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.tasks import load_role  # noqa: E402
from engine.teacher import choice_chars, forward_rows, teacher_choice_logprobs  # noqa: E402

OUT = REPO / "bench" / "results" / "lm_eval_parity.json"
TASK_YAML = """task: pkd_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_lm_eval(venv: Path, model_dir: str, data: Path, work: Path, chat: bool) -> tuple[np.ndarray, dict, float]:
    """(Q, C) log-likelihoods in the file's order, lm-eval's metrics, seconds."""
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "pkd_parity.yaml").write_text(TASK_YAML.format(data=data))
    out = work / ("out-chat" if chat else "out")
    cmd = [str(venv / "bin" / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", "pkd_parity", "--include_path", str(tasks), "--batch_size", "16", "--device", "cpu",
           "--log_samples", "--output_path", str(out)]
    if chat:
        cmd.append("--apply_chat_template")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"lm_eval failed ({res.returncode}):\n{res.stderr[-4000:]}")
    samples = sorted(out.rglob("samples_pkd_parity_*.jsonl"))[-1]
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]["pkd_parity"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows.sort(key=lambda r: r["doc_id"])
    width = max(len(r["resps"]) for r in rows)
    ll = np.full((len(rows), width), -np.inf)
    for q, r in enumerate(rows):
        ll[q, : len(r["resps"])] = [float(x[0][0]) for x in r["resps"]]
    return ll, {k: v for k, v in results.items() if k.startswith("acc")}, seconds


def engine_scores(cfg, model, tok, examples) -> tuple[np.ndarray, np.ndarray, float]:
    """(none, bytes) (Q, C) choice scores from the engine's teacher forward, seconds."""
    t0 = time.perf_counter()
    seqs = build_sequences(examples, tok, cfg.prompt)
    out = forward_rows(model, seqs, np.arange(seqs.n_rows), [1], pool=cfg.prompt.pool, pad_id=tok.pad_token_id)
    none = teacher_choice_logprobs(seqs, out.scores, normalise="none")
    by = teacher_choice_logprobs(seqs, out.scores, normalise="bytes", chars=choice_chars(examples))
    return none, by, time.perf_counter() - t0


def compare(engine_none: np.ndarray, engine_bytes: np.ndarray, lm_ll: np.ndarray, answer: np.ndarray, lm_metrics: dict,
            examples) -> dict:
    present = np.isfinite(lm_ll)
    diff = np.abs(engine_none[present] - lm_ll[present])
    lm_norm = lm_ll / np.maximum(choice_chars(examples), 1)
    return {
        "choices": int(present.sum()),
        "max_abs_diff_loglik": float(diff.max()), "mean_abs_diff_loglik": float(diff.mean()),
        "acc_engine": float((engine_none.argmax(1) == answer).mean()), "acc_lm_eval": lm_metrics.get("acc,none"),
        "acc_norm_engine_bytes": float((engine_bytes.argmax(1) == answer).mean()),
        "acc_norm_lm_eval": lm_metrics.get("acc_norm,none"),
        "same_prediction": int((engine_none.argmax(1) == lm_ll.argmax(1)).sum()),
        "same_prediction_norm": int((engine_bytes.argmax(1) == lm_norm.argmax(1)).sum()),
        "questions": len(answer),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("LM_EVAL_VENV", "/work/lmeval-venv")))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--chat", action="store_true", help="also compare with the teacher's chat template")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    cfg = load(REPO / "configs/default.yaml", ["teacher.dtype=float32"])
    examples = load_role(cfg.data, "test")[: args.n]
    answer = np.asarray([ex.answer for ex in examples])
    model_dir = resolve_model(cfg.teacher)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, "float32")
    t0 = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="pkd-lm-eval-") as tmp:
        work = Path(tmp)
        data = work / "test.jsonl"
        data.write_text("".join(json.dumps({"id": ex.id, "question": ex.question, "choices": list(ex.choices),
                                            "answer": ex.answer}) + "\n" for ex in examples))
        for chat in ([False, True] if args.chat else [False]):
            c = replace(cfg, prompt=replace(cfg.prompt, chat_template=chat))
            e_none, e_bytes, e_s = engine_scores(c, model, tok, examples)
            lm_ll, lm_metrics, lm_s = run_lm_eval(args.venv, model_dir, data, work, chat)
            runs["chat_template" if chat else "plain"] = {
                **compare(e_none, e_bytes, lm_ll, answer, lm_metrics, examples),
                "engine_seconds": round(e_s, 1), "lm_eval_seconds": round(lm_s, 1)}
    venv_py = args.venv / "bin" / "python"
    lm_version = subprocess.run([str(venv_py), "-c", "import importlib.metadata as m; print(m.version('lm-eval'))"],
                                capture_output=True, text=True).stdout.strip()
    results = {
        "command": " ".join(["python", "bench/lm_eval_parity.py", *sys.argv[1:]]),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "task": f"the default's ARC-Easy test sample, first {len(examples)} questions, per-choice prompt",
        "teacher": f"{cfg.teacher.model} ({model_dir}), float32",
        "machine": {"cpus": os.cpu_count(), "cpu_flags": hardware.matmul_flags()},
        "versions": {"lm-eval": lm_version, **{p: md.version(p) for p in ("torch", "transformers")}},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in runs.items():
        print(f"{name:<14} max|dll| {r['max_abs_diff_loglik']:.2e}  acc engine {r['acc_engine']:.4f} lm-eval "
              f"{r['acc_lm_eval']:.4f}  acc_norm engine {r['acc_norm_engine_bytes']:.4f} lm-eval "
              f"{r['acc_norm_lm_eval']:.4f}  same argmax {r['same_prediction']}/{r['questions']}, "
              f"norm {r['same_prediction_norm']}/{r['questions']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
