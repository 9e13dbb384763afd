"""GPU check: the engine's device code paths on tiny random models built here, against CPU float32.

    python3 bench/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu_check.json  # here: the same checks on CPU

The device is cuda when torch sees one, else cpu (then every "device" number is a CPU one and the
script only proves it runs). Nothing is downloaded and no data file is read: the questions are
synthetic ("Which of these is a fruit?" with one fruit among words of other categories), the teacher is
a random 4-block Llama (head_dim 64) and the student a random 2-block BERT, each with a tokenizer trained
here on those questions by `tests/conftest.py`'s builders. Checks, each run on its own (one failing does
not stop the others) and written to the JSON as it ends, with its numbers, wall time and, when it
fails, the last lines of its traceback:

  build          the tiny teacher and student folders (tokenizers trained on the questions).
  dtype          `engine.hardware.pick_dtype('auto', gpu=True)` is bfloat16; what gpu=False and
                 `hardware.resolve` give on this machine.
  teacher        `engine.teacher.forward_rows` (per_choice with pool last and mean, letter): scores and
                 states on the device in float32 against CPU float32, in bfloat16 (looser: the
                 difference, and whether the chosen answers agree), the device's float32 scores and
                 states against a plain transformers forward of each row alone, and the teacher loaded
                 with `device_map='auto'` (accelerate, as with gpus_per_replica > 1); the early exit
                 (no scores: the blocks above the deepest layer never run) gives the same states. Timed.
  student        a BERT student trained through `engine.fit.fit_job` / `finish_job` with a
                 `fit.Worker` on the device and the dtype `pick_dtype` gives there (bf16 autocast on a
                 GPU), as the Ray Train worker runs them; it must learn the task. Saved with
                 `engine.student_folder.save_student`, loaded back on the device and on CPU, and
                 `predict_examples` (what `distill predict` calls) on each must agree.
  train_parity   the same student (dropout off) trained on the same batches on CPU and on the device in
                 float32: the same losses and predictions; the device's own dtype beside them.
  features       the head regime's `engine.student.pool_features` on the device against CPU, then a
                 head trained on the device's features through `fit_job`.
  top_regime     (where engine.student has it) the top-block regime's cached bottom states
                 (`bottom_states`) on the device against CPU, `skip_bottom`'s forward against the full
                 one, and a student trained on the cached states through `fit_job`.
  checkpoint     the fused AdamW through `fit.optimizer_state` / `write_checkpoint` / `read_checkpoint` /
                 `load_optimizer` into a fresh student on the device (the resume path): weights and state
                 restored exactly, and the next step from the same gradients equal; `engine.tensorfile`
                 fed a CUDA tensor writes `save_file`'s bytes.
  lm_student     a decoder student scoring with its LM head (`student.scoring=lm`, both modes) on the
                 device against CPU and against the teacher's own scores, and one training epoch.
  ddp            one-rank DistributedDataParallel (NCCL on GPU, gloo on CPU), as Ray Train's
                 prepare_model wraps the student when num_workers > 1, through `train_epoch` and
                 `predict`, and the float64 loss all-reduce `cluster.train._all_reduce` does. Trainable
                 parameters the forward never uses are listed (DDP refuses them) under `findings`.

Needs torch, transformers, tokenizers, safetensors, numpy and pyyaml; not ray, zarr, gguf, datasets,
vllm or pytest. `engine.student_folder` imports zarr (engine.artifacts -> engine.store) and
`tests/conftest.py` imports pytest, neither used by what runs here: where one is missing a stub module
stands in, and the JSON's `stubs` says which. `--block ray,zarr,...` makes modules unimportable, to
rehearse the GPU machine's environment here. Without a GPU torch runs on one CPU thread (`--threads`):
on a loaded machine more threads made these tiny ops many times slower. The work folder (in the temp
dir) is removed at the end unless `--keep`. Exit status 0 when every check passes, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import types
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", help="write the JSON summary here (it is also printed)")
parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 when there is no GPU, where a "
                    "loaded machine's spinning OpenMP threads slow tiny ops many-fold; else torch's default)")
parser.add_argument("--keep", action="store_true", help="keep the work folder (models, student folder, checkpoint)")
parser.add_argument("--block", default="", help="comma-separated modules to make unimportable, e.g. "
                    "ray,zarr,gguf,datasets,vllm,pytest (rehearses the GPU machine here)")
args = parser.parse_args()
T_START = time.perf_counter()

# ---------------------------------------------------------------------------------------------
# The environment: modules this script must do without, and stubs for the two that are imported only


class _Blocked(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} is blocked (--block)")
        return None


if args.block:
    sys.meta_path.insert(0, _Blocked({n.strip() for n in args.block.split(",") if n.strip()}))

STUBS = []
try:
    import zarr  # noqa: F401 - only engine.store's module-level import needs it
except ImportError:
    class _Codec:
        def __init__(self, *a, **k):
            pass

    codecs = types.ModuleType("zarr.codecs")
    codecs.Crc32cCodec = codecs.ZstdCodec = _Codec
    sys.modules["zarr"] = types.ModuleType("zarr")
    sys.modules["zarr"].codecs = sys.modules["zarr.codecs"] = codecs
    STUBS.append("zarr (engine.student_folder -> engine.artifacts -> engine.store imports it; no store is opened)")
try:
    import pytest  # noqa: F401 - tests/conftest.py decorates its fixtures with it
except ImportError:
    def _fixture(*a, **k):
        return a[0] if a and callable(a[0]) else (lambda f: f)

    sys.modules["pytest"] = types.ModuleType("pytest")
    sys.modules["pytest"].fixture = _fixture
    STUBS.append("pytest (tests/conftest.py decorates fixtures; only its model builders are used)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # the loading bars of every from_pretrained

import conftest  # noqa: E402  (tests/conftest.py: build_tiny_model, build_tiny_bert)

from engine import fit, hardware, labels  # noqa: E402
from engine import student as st  # noqa: E402
from engine import student_folder as sf  # noqa: E402
from engine.config import PromptConfig, from_dict  # noqa: E402
from engine.metrics import accuracy  # noqa: E402
from engine.models import load_causal_lm, load_tokenizer  # noqa: E402
from engine.prompts import letter_prompt  # noqa: E402
from engine.sequences import build_sequences  # noqa: E402
from engine.tasks import Example  # noqa: E402
from engine.teacher import forward_rows, teacher_choice_logprobs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
CPU = torch.device("cpu")
if args.threads or not GPU:
    torch.set_num_threads(args.threads or 1)
WORK = Path(tempfile.mkdtemp(prefix="gpu_check-"))

SUMMARY: dict = {
    "device": str(DEVICE),
    "env": {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if GPU else None,
        "capability": list(torch.cuda.get_device_capability(0)) if GPU else None,
        "cpu_threads": torch.get_num_threads(), "cpu_matmul_flags": hardware.matmul_flags(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    },
    "stubs": STUBS,
    "checks": {},
}
if GPU:
    _t = time.perf_counter()
    torch.zeros(1, device=DEVICE).sum().item()
    SUMMARY["env"]["cuda_init_s"] = round(time.perf_counter() - _t, 2)


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def timed(fn):
    """(fn(), seconds), the device synchronised on both sides."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, round(time.perf_counter() - t0, 4)


def maxabs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fin = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0


def same_infs(a, b) -> bool:
    return bool(np.array_equal(np.isfinite(a), np.isfinite(b)))


def save() -> None:
    SUMMARY["all_pass"] = all(c["pass"] for c in SUMMARY["checks"].values())
    SUMMARY["wall_s"] = round(time.perf_counter() - T_START, 2)
    if GPU:
        SUMMARY["env"]["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(SUMMARY, indent=2, default=str) + "\n")


def check(fn):
    """Run the check now; record its numbers (its own `pass`), wall time, or the traceback's end."""
    t0 = time.perf_counter()
    try:
        out = dict(fn() or {})
        ok = bool(out.pop("pass", True))
        entry = {"pass": ok, **out}
    except Exception:  # noqa: BLE001 - one check's failure must not stop the others
        entry = {"pass": False, "error": traceback.format_exc().strip().splitlines()[-8:]}
    entry["wall_s"] = round(time.perf_counter() - t0, 2)
    SUMMARY["checks"][fn.__name__] = entry
    save()
    print(f"[gpu_check] {fn.__name__}: {'PASS' if entry['pass'] else 'FAIL'} ({entry['wall_s']} s)", flush=True)
    if "error" in entry:
        print("    " + "\n    ".join(entry["error"]), flush=True)
    return fn


print(f"[gpu_check] device {DEVICE}" + (f" ({SUMMARY['env']['gpu']})" if GPU else "") + f", work dir {WORK}", flush=True)

# ---------------------------------------------------------------------------------------------
# Synthetic questions: "Which of these is a fruit?" (in several wordings), one fruit among 2-3 words
# of other categories. A tiny student learns it in a few dozen steps; chance is about 29%.

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "color": ["red", "blue", "green", "yellow", "purple", "brown", "pink", "gray", "white", "black"],
    "animal": ["dog", "horse", "cow", "lion", "tiger", "rabbit", "mouse", "sheep", "goat", "bear"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "pliers", "rake", "axe", "file"],
}
TEMPLATES = ["Which of these is a fruit?", "Which one of the following can you eat as a fruit?",
             "Pick the fruit from the list.", "Which word names a fruit?"]


def make_examples(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 5))
        others = rng.choice(["color", "animal", "tool"], k - 1, replace=False)
        choices = [str(rng.choice(CATEGORIES[c])) for c in others]
        answer = int(rng.integers(k))
        choices.insert(answer, str(rng.choice(CATEGORIES["fruit"])))
        out.append(Example(f"q{seed}-{i}", TEMPLATES[int(rng.integers(len(TEMPLATES)))], tuple(choices), answer))
    return out


TEACHER = BERT = None


@check
def build():
    """The tiny models, each with a tokenizer trained on these questions as per-choice and letter prompts
    (so that ' A' .. ' D' are single tokens, as letter mode needs)."""
    global TEACHER, BERT
    corpus = make_examples(300, seed=99)
    conftest.arc_texts = lambda: ([ex.question + " " + " ".join(ex.choices) for ex in corpus]
                                  + [letter_prompt(ex, " {letter}") + " " + "ABCD"[i % 4] for i, ex in enumerate(corpus)])
    TEACHER = conftest.build_tiny_model(WORK / "teacher")  # random Llama, 4 blocks, hidden 128, head_dim 64
    BERT = conftest.build_tiny_bert(WORK / "bert")  # random BERT, 2 blocks, hidden 64, its own WordPiece vocabulary
    return {"teacher": str(TEACHER), "student": str(BERT)}


STATE: dict = {}  # what one check hands to a later one

# ---------------------------------------------------------------------------------------------
# 1. The compute dtype `auto` picks


@check
def dtype():
    on_gpu, on_cpu = hardware.pick_dtype("auto", gpu=True), hardware.pick_dtype("auto", gpu=False)
    _, resolved = hardware.resolve(from_dict({"student": {"use_gpu": GPU}, "extract": {"gpus_per_replica": float(GPU)}}))
    return {"pass": on_gpu[0] == "bfloat16", "gpu_true": on_gpu, "gpu_false": on_cpu, "resolve_here": resolved}


# ---------------------------------------------------------------------------------------------
# 2. The teacher forward: device float32 and bfloat16 against CPU float32, and against plain transformers

LAYERS = [1, 2, 4]


@torch.no_grad()
def plain_forward(model, seqs, r: int, pool: str):
    """One row alone through transformers: its scores (the choice's log-likelihood, or the label
    log-probs) and its states at LAYERS (last token, or the mean over the choice's tokens)."""
    ids = torch.as_tensor(seqs.ids[r], device=model.device)[None]
    out = model(ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    s = int(seqs.start[r])
    if seqs.mode == "per_choice":
        score = [float(logp[s - 1 : -1].gather(1, ids[0, s:, None]).sum())]
    else:
        score = logp[-1, torch.as_tensor(seqs.letter_ids[: int(seqs.n_choices[seqs.row_question[r]])])].tolist()
    states = [out.hidden_states[layer][0, s:].mean(0) if pool == "mean" else out.hidden_states[layer][0, -1]
              for layer in LAYERS]
    return score, torch.stack(states).float().cpu().numpy()


@check
def teacher():
    tok = load_tokenizer(str(TEACHER))
    examples = make_examples(24, seed=1)
    cpu32 = load_causal_lm(str(TEACHER), "float32")
    dev32 = load_causal_lm(str(TEACHER), "float32").to(DEVICE)  # as the extraction actor: load, then .to(device)
    dev16 = load_causal_lm(str(TEACHER), "bfloat16").to(DEVICE)
    auto = load_causal_lm(str(TEACHER), "float32", device_map="auto")  # accelerate's placement (gpus_per_replica > 1)
    res, ok = {}, True
    for mode, pool in (("per_choice", "last"), ("per_choice", "mean"), ("letter", "last")):
        seqs = build_sequences(examples, tok, PromptConfig(mode=mode, pool=pool))
        rows = np.arange(seqs.n_rows)

        def run(model, seqs=seqs, rows=rows, pool=pool):
            return forward_rows(model, seqs, rows, LAYERS, pool=pool, pad_id=tok.pad_token_id, batch_size=8)

        run(dev32), run(dev16)  # warm-up: kernels loaded and chosen
        ref, t_cpu = timed(lambda run=run: run(cpu32))
        f32, t32 = timed(lambda run=run: run(dev32))
        b16, t16 = timed(lambda run=run: run(dev16))
        placed = run(auto)
        short = forward_rows(dev32, seqs, rows, LAYERS[:2], pool=pool, pad_id=tok.pad_token_id, batch_size=8, scores=False)
        plain = [plain_forward(dev32, seqs, r, pool) for r in rows]
        plain_scores = [s for s, _ in plain]
        got_scores = [f32.scores[r, :1] if mode == "per_choice" else f32.scores[r, : len(plain_scores[r])] for r in rows]
        lp = {k: teacher_choice_logprobs(seqs, v.scores) for k, v in (("cpu32", ref), ("dev32", f32), ("dev16", b16))}
        pick = {k: v.argmax(1) for k, v in lp.items()}
        top2 = np.sort(np.where(np.isfinite(lp["cpu32"]), lp["cpu32"], -1e9), 1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 0.1  # questions whose fp32 winner leads by > 0.1 nat
        r = {
            "rows": int(seqs.n_rows), "tokens": int(ref.tokens),
            "seconds": {"cpu_fp32": t_cpu, "device_fp32": t32, "device_bf16": t16},
            "fp32_scores_maxabs_vs_cpu": maxabs(f32.scores, ref.scores),
            "fp32_states_maxabs_vs_cpu": maxabs(f32.states, ref.states),
            "states_absmax": float(np.abs(ref.states.astype(np.float32)).max()),
            "fp32_scores_maxabs_vs_plain_hf": max(maxabs(g, p) for g, p in zip(got_scores, plain_scores)),
            "fp32_states_maxabs_vs_plain_hf": max(maxabs(f32.states[r], p) for r, (_, p) in zip(rows, plain)),
            "bf16_scores_maxabs_vs_cpu": maxabs(b16.scores, ref.scores),
            "bf16_states_maxabs_vs_cpu": maxabs(b16.states, ref.states),
            "bf16_choice_agreement": float((pick["dev16"] == pick["cpu32"]).mean()),
            "bf16_choice_agreement_decisive": float((pick["dev16"] == pick["cpu32"])[decisive].mean()) if decisive.any() else None,
            "decisive_questions": int(decisive.sum()),
            "fp32_choice_agreement": float((pick["dev32"] == pick["cpu32"]).mean()),
            "same_inf_pattern": same_infs(f32.scores, ref.scores) and same_infs(b16.scores, ref.scores),
            "device_map_auto_on": str(next(auto.parameters()).device),
            "device_map_auto_scores_maxabs_vs_device_fp32": maxabs(placed.scores, f32.scores),
            "early_exit_states_equal": bool(short.scores is None and np.array_equal(short.states, f32.states[:, :2])),
        }
        # float32: ~1e-5 expected; states are stored as float16, so they differ by up to an fp16 step
        r["pass"] = bool(r["same_inf_pattern"] and r["fp32_scores_maxabs_vs_cpu"] <= 1e-3
                         and r["fp32_scores_maxabs_vs_plain_hf"] <= 1e-3 and r["fp32_choice_agreement"] == 1.0
                         and r["fp32_states_maxabs_vs_cpu"] <= 2e-3 * max(1.0, r["states_absmax"])
                         and r["fp32_states_maxabs_vs_plain_hf"] <= 2e-3 * max(1.0, r["states_absmax"])
                         and r["bf16_scores_maxabs_vs_cpu"] <= 0.5 and r["device_map_auto_scores_maxabs_vs_device_fp32"] <= 1e-4
                         and r["early_exit_states_equal"] and r["bf16_choice_agreement_decisive"] in (None, 1.0))
        ok &= r["pass"]
        res[f"{mode}_{pool}"] = r
        if mode == "per_choice" and pool == "last":
            STATE["teacher_probs_per_choice"] = lp["cpu32"]
        if mode == "letter":
            STATE["teacher_probs_letter"] = lp["cpu32"]
    return {"pass": ok, **res}


# ---------------------------------------------------------------------------------------------
# 3. The student: trained on the device as the Ray Train worker trains it, saved, loaded back


def student_config(**kw):
    base = {"model": str(BERT), "epochs": 6, "lr": 3e-3, "batch_size": 8, "max_length": 32, "use_gpu": GPU,
            "head_epochs": 30, "head_batch_size": 32, "head_lr": 1e-2}
    return from_dict({"student": base | kw}).student


DATA = {"train": make_examples(128, seed=10), "validation": make_examples(48, seed=11), "test": make_examples(64, seed=12)}
MAX_CHOICES = 4


def fit_student(scfg, splits, pad_id, *, device=DEVICE, dtype=None, features=None, seed=0, prepare=None):
    """One job through engine.fit, as cluster.train._train_job runs it on a worker of rank 0 of 1: built
    on CPU, `prepare(model)` (e.g. `skip_bottom`), then moved to the device (prepare_model), in the dtype
    `pick_dtype` decides there unless given."""
    why = "given"
    if dtype is None:
        dtype, why = hardware.pick_dtype(scfg.dtype, gpu=torch.device(device).type == "cuda")
    worker = fit.Worker(0, 1, device, dtype)
    torch.manual_seed(seed)
    model = st.build_student(scfg.model, scfg, max_choices=MAX_CHOICES)
    names = st.set_trainable(model, scfg.finetune, scfg.top_blocks)
    if prepare is not None:
        prepare(model)
    model.to(device)
    optimizer = st.make_optimizer(model, scfg.train_lr, scfg.weight_decay)
    train = splits["train"]
    questions = np.arange(train.n_questions)
    steps = fit.steps_per_epoch(len(questions), worker.world, scfg.train_batch_size)
    scheduler = st.make_scheduler(optimizer, steps * scfg.train_epochs)
    triple = fit.job_targets(questions, st.one_hot(train.answer, MAX_CHOICES), train.answer, train, MAX_CHOICES)
    progress = fit.fit_job(model, names, splits, triple, scfg=scfg, seed=seed,
                           alpha=labels.loss_alpha("gold", scfg.alpha, scfg.mix_alpha), epochs=scfg.train_epochs,
                           pad_id=pad_id, optimizer=optimizer, scheduler=scheduler, worker=worker,
                           progress=fit.JobProgress(), features=features)
    done = fit.finish_job(model, names, splits, progress, scfg=scfg, pad_id=pad_id, worker=worker, features=features)
    return model, optimizer, done, progress, dtype, why


@check
def student():
    scfg = student_config()
    tok, spec = st.student_inputs(scfg, str(BERT), " {letter}")
    splits = {k: st.encode_examples(v, tok, spec) for k, v in DATA.items()}
    (model, optimizer, done, progress, dtype, why), seconds = timed(lambda: fit_student(scfg, splits, tok.pad_token_id))
    m = done.metrics(splits)
    fused = [g.get("fused") for g in optimizer.param_groups]
    folder = sf.save_student(WORK / "student", model, tok, spec, {"source": "gold", "dtype": dtype, "dtype_why": why,
                                                                  "test_acc": m["test_acc"]})
    bs = 4 * scfg.batch_size  # the batches finish_job predicted with: the same padding
    on_dev, tok_d, info = sf.load_student(folder)
    on_cpu, tok_c, _ = sf.load_student(folder)
    p_dev, t_dev = timed(lambda: sf.predict_examples(on_dev, tok_d, info, DATA["test"], batch_size=bs, device=DEVICE))
    p_cpu, t_cpu = timed(lambda: sf.predict_examples(on_cpu, tok_c, info, DATA["test"], batch_size=bs, device=CPU))
    p_dev32 = sf.predict_examples(on_dev, tok_d, info, DATA["test"], batch_size=bs, device=DEVICE, dtype="float32")
    p_cpu32 = sf.predict_examples(on_cpu, tok_c, info, DATA["test"], batch_size=bs, device=CPU, dtype="float32")
    p_cli = sf.predict_examples(*sf.load_student(folder), DATA["test"])  # exactly what `distill predict` runs
    answer = splits["test"].answer
    STATE["student"] = (scfg, tok, spec, splits)
    r = {
        "dtype": dtype, "dtype_why": why, "fused_adamw": fused, "fit_seconds": seconds,
        "epoch_seconds": [round(h["seconds"], 3) for h in progress.history],
        "train_loss": [round(h["train_loss"], 4) for h in progress.history],
        "val_acc": [round(h["val_acc"], 4) for h in progress.history],
        "best_epoch": m["best_epoch"], "test_acc": m["test_acc"], "chance": float(np.mean(1 / splits["test"].n_choices)),
        "reloaded_device_maxabs_vs_trained": maxabs(p_dev, done.test_probs),
        "reloaded_cpu_maxabs_vs_device": maxabs(p_cpu, p_dev),
        "reloaded_cpu_vs_device_agreement": float((p_cpu.argmax(1) == p_dev.argmax(1)).mean()),
        "fp32_cpu_maxabs_vs_device": maxabs(p_cpu32, p_dev32),
        "predict_seconds": {"device": t_dev, "cpu": t_cpu},
        "reloaded_device_acc": accuracy(p_dev, answer), "reloaded_cpu_acc": accuracy(p_cpu, answer),
        "distill_predict_path_acc": accuracy(p_cli, answer),
        "distill_predict_path_device": "cpu (cluster/cli.py calls predict_examples without device=)",
    }
    r["pass"] = bool(max(r["val_acc"]) >= 0.6 and r["test_acc"] >= 0.6 and r["test_acc"] > r["chance"] + 0.25
                     and (not GPU or all(fused)) and r["reloaded_device_maxabs_vs_trained"] <= 1e-3
                     and r["fp32_cpu_maxabs_vs_device"] <= 1e-4 and r["reloaded_cpu_vs_device_agreement"] >= 0.9
                     and np.isfinite(r["train_loss"]).all())
    return r


@check
def train_parity():
    """The same student trained from the same weights on the same batches on the device and on CPU, in
    float32 (dropout off, so that no random stream differs): the losses and the kept student's
    predictions must agree; the device's own dtype (bf16 autocast on a GPU) is reported beside them."""
    nodrop = WORK / "bert-nodrop"
    shutil.copytree(BERT, nodrop)
    cfg = json.loads((nodrop / "config.json").read_text())
    (nodrop / "config.json").write_text(json.dumps(cfg | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    scfg = student_config(model=str(nodrop), epochs=2, lr=1e-3)
    tok, spec = st.student_inputs(scfg, scfg.model, " {letter}")
    splits = {k: st.encode_examples(v, tok, spec) for k, v in DATA.items()}
    runs = {"cpu_fp32": fit_student(scfg, splits, tok.pad_token_id, device=CPU, dtype="float32"),
            "device_fp32": fit_student(scfg, splits, tok.pad_token_id, device=DEVICE, dtype="float32")}
    dtype = hardware.pick_dtype(scfg.dtype, gpu=GPU)[0]
    runs[f"device_{dtype}"] = fit_student(scfg, splits, tok.pad_token_id, device=DEVICE, dtype=dtype)
    ref = runs["cpu_fp32"]
    r = {k: {"train_loss": [h["train_loss"] for h in v[3].history], "val_acc": [h["val_acc"] for h in v[3].history],
             "test_probs_maxabs_vs_cpu_fp32": maxabs(v[2].test_probs, ref[2].test_probs),
             "train_loss_maxabs_vs_cpu_fp32": maxabs([h["train_loss"] for h in v[3].history],
                                                     [h["train_loss"] for h in ref[3].history])}
         for k, v in runs.items()}
    d = r["device_fp32"]
    r["pass"] = bool(d["train_loss_maxabs_vs_cpu_fp32"] <= 5e-3 and d["test_probs_maxabs_vs_cpu_fp32"] <= 5e-2
                     and np.isfinite(r[f"device_{dtype}"]["train_loss"]).all())
    return r


# ---------------------------------------------------------------------------------------------
# 4. The head regime: pooled features of the frozen backbone on the device, and a head trained on them


@check
def features():
    scfg = student_config(finetune="head")
    tok, spec = st.student_inputs(scfg, str(BERT), " {letter}")
    splits = {k: st.encode_examples(v, tok, spec) for k, v in DATA.items()}
    dtype, _ = hardware.pick_dtype(scfg.dtype, gpu=GPU)
    model = st.build_student(str(BERT), scfg, max_choices=MAX_CHOICES)

    def pool(split, device, dt):
        return st.pool_features(model, splits[split], batch_size=4 * scfg.train_batch_size, pad_id=tok.pad_token_id,
                                device=device, dtype=dt)

    ref, t_cpu = timed(lambda: pool("train", CPU, "float32"))
    model.to(DEVICE)
    pool("train", DEVICE, dtype)  # warm-up
    f32, t32 = timed(lambda: pool("train", DEVICE, "float32"))
    fdt, tdt = timed(lambda: pool("train", DEVICE, dtype))  # what cluster.train._features computes
    feats = {k: pool(k, DEVICE, dtype) for k in splits}
    _, _, done, progress, _, _ = fit_student(scfg, splits, tok.pad_token_id, features=feats)
    r = {
        "rows": int(ref.shape[0]), "hidden": int(ref.shape[1]), "absmax": float(np.abs(ref).max()),
        "fp32_maxabs_vs_cpu": maxabs(f32, ref), f"{dtype}_maxabs_vs_cpu_fp32": maxabs(fdt, ref),
        "seconds": {"cpu_fp32": t_cpu, "device_fp32": t32, f"device_{dtype}": tdt},
        "head_train_loss_first_last": [round(progress.history[0]["train_loss"], 4), round(progress.history[-1]["train_loss"], 4)],
        "head_best_val_acc": max(h["val_acc"] for h in progress.history), "head_test_acc": done.metrics(splits)["test_acc"],
    }
    loss = [h["train_loss"] for h in progress.history]
    r["pass"] = bool(r["fp32_maxabs_vs_cpu"] <= 1e-4 * max(1.0, r["absmax"])
                     and r[f"{dtype}_maxabs_vs_cpu_fp32"] <= 0.1 * max(1.0, r["absmax"])
                     and np.isfinite(loss).all() and loss[-1] < loss[0])
    return r


@check
def top_regime():
    """finetune='top' with the frozen bottom blocks' token states computed once (`bottom_states`, as
    cluster.train._features does) and skipped in training (`skip_bottom`): states on the device against
    CPU, the skipping forward against the full one, and a student trained on them through fit_job."""
    if not hasattr(st, "bottom_states"):
        return {"skipped": "engine.student has no bottom_states / skip_bottom"}
    scfg = student_config(finetune="top", top_blocks=1)
    tok, spec = st.student_inputs(scfg, str(BERT), " {letter}")
    splits = {k: st.encode_examples(v, tok, spec) for k, v in DATA.items()}
    dtype, _ = hardware.pick_dtype(scfg.dtype, gpu=GPU)
    kw = dict(top_blocks=scfg.top_blocks, batch_size=4 * scfg.batch_size, pad_id=tok.pad_token_id)
    model = st.build_student(str(BERT), scfg, max_choices=MAX_CHOICES)
    val = splits["validation"]
    ref, t_cpu = timed(lambda: st.bottom_states(model, val, device=CPU, dtype="float32", **kw))
    model.to(DEVICE)
    f32, t32 = timed(lambda: st.bottom_states(model, val, device=DEVICE, dtype="float32", **kw))
    fdt, tdt = timed(lambda: st.bottom_states(model, val, device=DEVICE, dtype=dtype, **kw))
    st.skip_bottom(model, scfg.top_blocks)
    model.eval()
    batch = st.make_batches(val, None, np.arange(val.n_questions), 16, tok.pad_token_id,
                            features=st.TokenStates.of(val, f32))[-1].to(DEVICE)
    with torch.no_grad():
        skipped, full = model(batch), model(dataclasses.replace(batch, states=None))
        zeroed = model(dataclasses.replace(batch, states=torch.zeros_like(batch.states)))  # the states are read
    feats = {k: st.TokenStates.of(v, st.bottom_states(model, v, device=DEVICE, dtype=dtype, **kw)) for k, v in splits.items()}
    _, _, done, progress, _, _ = fit_student(scfg, splits, tok.pad_token_id, features=feats,
                                             prepare=lambda m: st.skip_bottom(m, scfg.top_blocks))
    absmax = float(np.abs(ref).max())
    r = {"tokens": int(ref.shape[0]), "absmax": absmax, "fp32_maxabs_vs_cpu": maxabs(f32, ref),
         f"{dtype}_maxabs_vs_cpu_fp32": maxabs(fdt, ref), "seconds": {"cpu_fp32": t_cpu, "device_fp32": t32, f"device_{dtype}": tdt},
         "skipping_vs_full_forward_logits_maxabs": maxabs(skipped.float().cpu(), full.float().cpu()),
         "zeroed_states_vs_full_forward_logits_maxabs": maxabs(zeroed.float().cpu(), full.float().cpu()),
         "train_loss": [round(h["train_loss"], 4) for h in progress.history],
         "val_acc": [round(h["val_acc"], 4) for h in progress.history], "test_acc": done.metrics(splits)["test_acc"]}
    r["pass"] = bool(r["fp32_maxabs_vs_cpu"] <= 1e-4 * max(1.0, absmax) and r[f"{dtype}_maxabs_vs_cpu_fp32"] <= 0.1 * max(1.0, absmax)
                     and r["skipping_vs_full_forward_logits_maxabs"] <= 1e-4
                     and r["zeroed_states_vs_full_forward_logits_maxabs"] > 1e-3 and max(r["val_acc"]) >= 0.6
                     and np.isfinite(r["train_loss"]).all())
    return r


# ---------------------------------------------------------------------------------------------
# 5. Device-specific corners: the resume path's checkpoint and fused optimizer state, the tensor
# writer, an LM-head student, and one-rank DDP with the loss all-reduce


@check
def checkpoint():
    from safetensors.torch import save as st_save

    from engine.tensorfile import write_safetensors

    scfg = student_config()
    tok, spec = st.student_inputs(scfg, str(BERT), " {letter}")
    train = st.encode_examples(DATA["train"][:64], tok, spec)
    dtype, _ = hardware.pick_dtype(scfg.dtype, gpu=GPU)
    targets = st.one_hot(train.answer, MAX_CHOICES)

    batches = st.make_batches(train, targets, np.arange(train.n_questions), 16, tok.pad_token_id,
                              rng=np.random.default_rng(0))
    torch.manual_seed(0)
    a = st.build_student(str(BERT), scfg, max_choices=MAX_CHOICES).to(DEVICE)
    names = st.set_trainable(a, "full")
    opt_a = st.make_optimizer(a, 1e-3, 0.01)
    st.train_epoch(a, batches, opt_a, soft=True, temperature=1.0, alpha=1.0, device=DEVICE, dtype=dtype)
    ckdir = WORK / "ckpt"
    ckdir.mkdir()
    fit.write_checkpoint(ckdir, current=fit.trainable_state(a, names), best=None, optimizer=fit.optimizer_state(opt_a),
                         schedule_step=len(batches), state={"job": 0, "epoch": 1})
    ck = fit.read_checkpoint(ckdir)
    # the resume path of cluster.train._train_job: weights into the CPU model, to the device, optimizer, its state
    b = st.build_student(str(BERT), scfg, max_choices=MAX_CHOICES)
    st.set_trainable(b, "full")
    fit.load_trainable(b, ck.current, names)
    b.to(DEVICE)
    opt_b = st.make_optimizer(b, 1e-3, 0.01)
    fit.load_optimizer(opt_b, ck.optimizer)
    pa, pb = list(a.parameters()), list(b.parameters())
    with torch.no_grad():
        same_weights = all(torch.equal(p, q) for p, q in zip(pa, pb, strict=True))
        same_state = all(torch.equal(opt_a.state[p][k], opt_b.state[q][k].to(opt_a.state[p][k].device))
                         for p, q in zip(pa, pb, strict=True) for k in opt_a.state.get(p, {}))
    state_devices = sorted({str(v.device) for s in opt_b.state.values() for v in s.values() if torch.is_tensor(v)})
    step_dtypes = sorted({str(s["step"].dtype) for s in opt_b.state.values()})
    # one step of each from the same gradients (one backward, copied: no kernel's atomics can differ)
    opt_a.zero_grad(set_to_none=True)
    batch = batches[0].to(DEVICE)
    with st.autocast(DEVICE, dtype):
        logits = a(batch).float()
    st.student_loss(logits, batch.targets, batch.gold, soft=True, temperature=1.0, alpha=1.0).backward()
    for p, q in zip(pa, pb, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    opt_a.step()
    opt_b.step()
    with torch.no_grad():
        diff = max(float((p - q).abs().max()) for p, q in zip(pa, pb, strict=True))
    trimmed = [k for k in ck.optimizer_tensors if k.endswith(".rows")]
    # the tensor writer fed a CUDA tensor, a bf16 one and an int one: save_file's bytes
    tensors = {"w": torch.randn(70, 33, device=DEVICE), "h": torch.randn(5, dtype=torch.bfloat16), "i": torch.arange(7)}
    write_safetensors(tensors, WORK / "t.safetensors")
    same_bytes = (WORK / "t.safetensors").read_bytes() == st_save({k: v.cpu() for k, v in tensors.items()})
    try:
        fd = os.open(WORK / "odirect", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
        os.close(fd)
        o_direct = hasattr(os, "O_DIRECT")
    except OSError as err:
        o_direct = f"refused: {err}"
    r = {"weights_restored_exactly": same_weights, "optimizer_state_restored_exactly": same_state,
         "params_maxabs_after_next_step": diff, "optimizer_state_devices": state_devices,
         "optimizer_step_dtypes": step_dtypes, "fused": [g.get("fused") for g in opt_b.param_groups],
         "trimmed_moment_tensors": len(trimmed), "tensorfile_same_bytes_as_save_file": same_bytes,
         "o_direct_in_work_dir": o_direct}
    r["pass"] = bool(same_weights and same_state and diff == 0.0 and state_devices == [str(pb[0].device)] and same_bytes)
    return r


@check
def lm_student():
    res, ok = {}, True
    examples = make_examples(24, seed=1)  # the teacher check's questions
    for mode in ("per_choice", "letter"):
        scfg = from_dict({"student": {"model": str(TEACHER), "scoring": "lm", "mode": mode, "max_length": 64,
                                      "use_gpu": GPU}}).student
        tok, spec = st.student_inputs(scfg, str(TEACHER), " {letter}")
        seqs = st.encode_examples(examples, tok, spec)
        dtype, _ = hardware.pick_dtype(scfg.dtype, gpu=GPU)
        model = st.build_student(str(TEACHER), scfg, max_choices=MAX_CHOICES, tokenizer=tok)

        def predict(device, dt, model=model, seqs=seqs, tok=tok):
            return st.predict(model, seqs, batch_size=8, pad_id=tok.pad_token_id, device=device, dtype=dt)

        ref = predict(CPU, "float32")
        model.to(DEVICE)
        p32, pdt = predict(DEVICE, "float32"), predict(DEVICE, dtype)
        teacher_lp = STATE.get(f"teacher_probs_{mode}")
        r = {"fp32_maxabs_vs_cpu": maxabs(p32, ref), f"{dtype}_maxabs_vs_cpu_fp32": maxabs(pdt, ref)}
        if teacher_lp is not None:  # the decoder student reads what the teacher reads: the same choice probabilities
            z = np.exp(teacher_lp - teacher_lp.max(1, keepdims=True))
            r["fp32_maxabs_vs_teacher_forward"] = maxabs(p32[:, : z.shape[1]], z / z.sum(1, keepdims=True))
        opt = st.make_optimizer(model, 1e-3, 0.0)
        batches = st.make_batches(seqs, st.one_hot(seqs.answer, MAX_CHOICES), np.arange(seqs.n_questions), 8,
                                  tok.pad_token_id, rng=np.random.default_rng(0))
        r["train_epoch_loss"] = st.train_epoch(model, batches, opt, soft=True, temperature=1.0, alpha=1.0,
                                               device=DEVICE, dtype=dtype)
        r["pass"] = bool(r["fp32_maxabs_vs_cpu"] <= 1e-4 and r.get("fp32_maxabs_vs_teacher_forward", 0.0) <= 1e-4
                         and r[f"{dtype}_maxabs_vs_cpu_fp32"] <= 0.1 and np.isfinite(r["train_epoch_loss"]))
        ok &= r["pass"]
        res[mode] = r
    return {"pass": ok, **res}


@check
def ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    scfg = student_config()
    tok, spec = st.student_inputs(scfg, str(BERT), " {letter}")
    train, val = (st.encode_examples(DATA[k], tok, spec) for k in ("train", "validation"))
    dtype, _ = hardware.pick_dtype(scfg.dtype, gpu=GPU)
    targets = st.one_hot(train.answer, MAX_CHOICES)

    def batches():
        return st.make_batches(train, targets, np.arange(train.n_questions), scfg.batch_size, tok.pad_token_id,
                               rng=np.random.default_rng(0))

    def fresh():
        torch.manual_seed(0)
        model = st.build_student(str(BERT), scfg, max_choices=MAX_CHOICES).to(DEVICE)
        st.set_trainable(model, scfg.finetune, scfg.top_blocks)
        return model

    def epoch(model, opt):
        return st.train_epoch(model, batches(), opt, soft=True, temperature=1.0, alpha=1.0, device=DEVICE, dtype=dtype)

    # Trainable parameters the student's forward never reaches (gradient None after a step): DDP, which
    # Ray Train's prepare_model wraps the student in when num_workers > 1, refuses them.
    model = fresh()
    st.train_epoch(model, batches()[:1], st.make_optimizer(model, scfg.lr, 0.0), soft=True, temperature=1.0, alpha=1.0,
                   device=DEVICE, dtype=dtype)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    out = {"backend": "nccl" if GPU else "gloo", "unused_trainable_parameters": unused}
    dist.init_process_group(out["backend"], init_method=f"file://{WORK / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        for kwargs in ({}, {"find_unused_parameters": True}):  # as prepare_model wraps it; then past unused ones
            wrapped = DistributedDataParallel(fresh(), device_ids=[DEVICE.index or 0] if GPU else None, **kwargs)
            opt = st.make_optimizer(wrapped, scfg.lr, scfg.weight_decay)
            try:
                loss, seconds = timed(lambda wrapped=wrapped, opt=opt: epoch(wrapped, opt))
            except RuntimeError as err:
                if kwargs or "did not receive grad" not in str(err):
                    raise
                out["error_with_prepare_model_defaults"] = str(err).splitlines()[0][:160]
                continue
            out |= {"ddp_kwargs": kwargs, "epoch_loss": loss, "epoch_seconds": seconds}
            break
        probs = st.predict(wrapped, val, batch_size=64, pad_id=tok.pad_token_id, device=DEVICE, dtype=dtype)
        # cluster.train._all_reduce's operation (which returns None in a group of one, so it is done here)
        buf = torch.tensor([loss * 128, 128.0], dtype=torch.float64, device=DEVICE)
        dist.all_reduce(buf)
        out["all_reduced_loss"] = float((buf[0] / buf[1]).cpu())
    finally:
        dist.destroy_process_group()
    out["val_acc_after_one_epoch"] = accuracy(probs, val.answer)
    if unused:
        SUMMARY.setdefault("findings", []).append(
            f"trainable parameters never used by the student's forward: {unused}; DistributedDataParallel as "
            "ray.train.torch.prepare_model builds it (num_workers > 1) fails at the second step")
    out["pass"] = bool(np.isfinite(loss) and abs(out["all_reduced_loss"] - loss) < 1e-9 and np.isfinite(probs).all())
    return out


# ---------------------------------------------------------------------------------------------

save()
if not args.keep:
    shutil.rmtree(WORK, ignore_errors=True)
print(json.dumps(SUMMARY, indent=2, default=str))
print(f"[gpu_check] {'all checks pass' if SUMMARY['all_pass'] else 'SOME CHECKS FAIL'} in {SUMMARY['wall_s']} s"
      + (f"; written to {args.out}" if args.out else ""), flush=True)
sys.exit(0 if SUMMARY["all_pass"] else 1)
