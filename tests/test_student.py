"""Student: losses, the truncated backbone, batching, a short training run, and Ray Train end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import student as st
from engine.config import from_dict
from engine.sequences import build_sequences
from engine.tasks import Example

torch.set_num_threads(1)  # the test machine is oversubscribed: 2 threads ran ~10x slower than 1


def load_examples(shared_data: Path, n: int, split: str = "train", skip: int = 0) -> list[Example]:
    out = []
    with open(shared_data / "arc_easy" / f"{split}.jsonl") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            r = json.loads(line)
            out.append(Example(r["id"], r["question"], tuple(r["choices"]), int(r["answer"]), r.get("subject")))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def sequences(shared_data, tokenizer, mode: str, n: int, skip: int = 0):
    cfg = from_dict({"prompt": {"mode": mode, "max_length": 64}})
    return build_sequences(load_examples(shared_data, n, skip=skip), tokenizer, cfg.prompt)


# ---------------------------------------------------------------------------------------------
# Losses


def _np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _random_case(seed=0, B=6, C=5):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([5, 4, 3, 5, 2, 4])[:B]
    mask = torch.arange(C)[None, :] < n[:, None]
    logits = torch.randn(B, C, generator=g) * 2
    logits = logits.masked_fill(~mask, float("-inf"))
    t = torch.rand(B, C, generator=g).masked_fill(~mask, 0.0)
    t = t / t.sum(-1, keepdim=True)
    gold = torch.tensor([int(torch.randint(0, int(k), (1,), generator=g)) for k in n])
    return logits, t, gold, n


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_soft_kl_matches_hand_computation(T):
    logits, t, gold, n = _random_case()
    got = st.student_loss(logits, t, gold, soft=True, temperature=T, alpha=1.0)
    want = []
    for b in range(len(n)):
        k = int(n[b])
        p = t[b, :k].double().numpy() ** (1 / T)
        p = p / p.sum()
        logq = _np_log_softmax(logits[b, :k].double().numpy() / T)
        want.append(T * T * float((p * (np.log(p) - logq)).sum()))
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5, abs=1e-6)


def test_alpha_zero_is_gold_cross_entropy():
    logits, t, gold, n = _random_case(1)
    ce = np.mean([-_np_log_softmax(logits[b, : int(n[b])].double().numpy())[int(gold[b])] for b in range(len(n))])
    for soft in (True, False):
        got = st.student_loss(logits, t, gold, soft=soft, temperature=3.0, alpha=0.0)
        assert float(got) == pytest.approx(ce, rel=1e-5)


def test_one_hot_targets_reduce_to_gold_ce():
    logits, _, gold, n = _random_case(2)
    hot = torch.from_numpy(st.one_hot(gold.numpy(), logits.shape[1]))
    ce = st.student_loss(logits, hot, gold, soft=True, temperature=1.0, alpha=0.0)
    for soft in (True, False):
        got = st.student_loss(logits, hot, gold, soft=soft, temperature=1.0, alpha=1.0)
        assert float(got) == pytest.approx(float(ce), rel=1e-5)


def test_hard_mode_is_ce_on_argmax_mixed_with_gold():
    logits, t, gold, n = _random_case(3)
    label = t.argmax(-1)
    logp = [_np_log_softmax(logits[b, : int(n[b])].double().numpy()) for b in range(len(n))]
    ce_t = np.mean([-lp[int(label[b])] for b, lp in enumerate(logp)])
    ce_g = np.mean([-lp[int(gold[b])] for b, lp in enumerate(logp)])
    got = st.student_loss(logits, t, gold, soft=False, temperature=4.0, alpha=0.3)
    assert float(got) == pytest.approx(0.3 * ce_t + 0.7 * ce_g, rel=1e-5)


@pytest.mark.parametrize("soft", [True, False])
def test_absent_choices_finite_loss_zero_grad(soft):
    logits, t, gold, n = _random_case(4)
    mask = torch.isfinite(logits)
    leaf = logits.clone().requires_grad_(True)  # holds -inf where a choice is absent
    loss = st.student_loss(leaf, t, gold, soft=soft, temperature=2.0, alpha=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[~mask] == 0).all()
    assert (leaf.grad[mask] != 0).any()
    # Finite garbage in absent slots changes nothing when the mask is given.
    junk = logits.masked_fill(~mask, 7.0)
    same = st.student_loss(junk, t, gold, soft=soft, temperature=2.0, alpha=0.5, mask=mask)
    assert float(same) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_temperature_scaling():
    logits, t, gold, n = _random_case(5)
    mask = torch.isfinite(logits)
    # T^2 factor: the loss at T is T^2 times the plain KL between the T-softened distributions.
    for T in (0.5, 2.0, 5.0):
        got = st.student_loss(logits, t, gold, soft=True, temperature=T, alpha=1.0)
        p = st.sharpen(t, mask, T)
        logq = torch.log_softmax(logits / T, -1).masked_fill(~mask, 0.0)
        kl = (torch.xlogy(p, p) - p * logq).sum(-1).mean()
        assert float(got) == pytest.approx(T * T * float(kl), rel=1e-5)
    # Re-sharpening: T > 1 flattens the targets, T < 1 sharpens, T = 1 leaves them.
    assert torch.allclose(st.sharpen(t, mask, 1.0), t, atol=1e-6)

    def ent(p):
        return float(-(torch.xlogy(p, p)).sum())

    assert ent(st.sharpen(t, mask, 3.0)) > ent(t) > ent(st.sharpen(t, mask, 0.3))
    # Zero loss when the student matches the targets at every T.
    match = torch.log(t.clamp_min(1e-30)).masked_fill(~mask, float("-inf"))
    for T in (0.5, 1.0, 3.0):
        assert float(st.student_loss(match, t, gold, soft=True, temperature=T, alpha=1.0)) == pytest.approx(0, abs=1e-5)
    # With T^2, gradients keep their scale as T grows (Hinton et al.): large-T gradient -> (z - v) / C.
    z = logits.masked_fill(~mask, 0.0)[:1, :5].clone().requires_grad_(True)
    v = torch.randn(1, 5)
    tv = torch.softmax(v, -1)
    for T in (100.0, 400.0):
        z.grad = None
        st.student_loss(z, tv, gold[:1], soft=True, temperature=T, alpha=1.0).backward()
        # targets_T = softmax(v / T) so the large-T limit is T^2 * (q_T - p_T) / T -> ((z - mean z) - (v - mean v)) / C
        want = ((z - z.mean()) - (v - v.mean())).detach() / 5
        assert torch.allclose(z.grad, want, atol=5e-2 * float(want.abs().max()))


def test_sharpen_does_not_underflow_at_small_temperature():
    t = torch.tensor([[1e-6, 2e-6, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    p = st.sharpen(t, mask, 0.05)
    assert torch.isfinite(p).all() and float(p.sum()) == pytest.approx(1.0)
    assert float(p[0, 1]) > 0.99 and float(p[0, 2]) == 0.0


def test_schedule_warms_up_then_decays():
    f = st.warmup_linear(100)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False)) and 0 < values[-1] < 0.05
    # A resumed run is placed at its step even when the restored optimizer carries lr 0.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    for group in opt.param_groups:
        group["lr"] = 0.0
        group["initial_lr"] = 0.5
    sched = st.make_scheduler(opt, 100, start_step=40)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * f(40)) and sched.last_epoch == 40


# ---------------------------------------------------------------------------------------------
# Model and batches


def test_truncated_backbone_keeps_pretrained_layers(tiny_model):
    from safetensors.torch import load_file

    m = st.StudentModel.from_pretrained(tiny_model, mode="per_choice", max_choices=4, num_layers=2)
    assert m.num_layers == 2 and len(m.backbone.layers) == 2
    ref = load_file(str(Path(tiny_model) / "model.safetensors"))
    own = m.backbone.state_dict()
    layer0 = [k for k in own if k.startswith("layers.0.")]
    assert layer0
    for k in layer0 + ["embed_tokens.weight", "norm.weight", "layers.1.mlp.up_proj.weight"]:
        assert torch.equal(own[k], ref["model." + k]), k
    with pytest.raises(ValueError, match="num_layers"):
        st.load_backbone(str(tiny_model), 9)


def test_batches_group_questions_and_truncate_left(shared_data, tokenizer):
    seqs = sequences(shared_data, tokenizer, "per_choice", 10)
    targets = st.one_hot(seqs.answer, seqs.max_choices)
    batches = st.make_batches(seqs, targets, np.arange(10), 3, pad_id=7, max_length=20, rng=np.random.default_rng(0))
    assert sorted(np.concatenate([b.questions for b in batches]).tolist()) == list(range(10))
    rows_of = st.question_rows(seqs)
    for b in batches:
        assert b.input_ids.shape[0] == sum(len(rows_of[q]) for q in b.questions)
        assert b.input_ids.shape[1] <= 20
        for i in range(b.input_ids.shape[0]):
            q = b.questions[int(b.row_question[i])]
            r = rows_of[q][int(b.row_choice[i])]
            want = seqs.ids[r][-20:]
            n = int(b.attention_mask[i].sum())
            assert n == len(want) and int(b.last_index[i]) == n - 1
            assert b.input_ids[i, :n].tolist() == want.tolist()
            assert (b.input_ids[i, n:] == 7).all()
        assert torch.equal(b.gold, torch.from_numpy(seqs.answer[b.questions]))


@pytest.mark.parametrize("mode", ["per_choice", "letter"])
def test_logits_shape_and_masking(shared_data, tokenizer, tiny_model, mode):
    seqs = sequences(shared_data, tokenizer, mode, 6)
    seqs.n_choices[1] = 3  # pretend question 1 has three choices (per-choice: drop its last row)
    if mode == "per_choice":
        keep = ~((seqs.row_question == 1) & (seqs.row_choice == 3))
        seqs = type(seqs)(
            mode=mode,
            ids=[x for x, k in zip(seqs.ids, keep, strict=True) if k],
            start=seqs.start[keep],
            row_question=seqs.row_question[keep],
            row_choice=seqs.row_choice[keep],
            n_choices=seqs.n_choices,
            answer=np.minimum(seqs.answer, 2),
            letter_ids=seqs.letter_ids,
        )
    torch.manual_seed(0)
    m = st.StudentModel.from_pretrained(tiny_model, mode=mode, max_choices=5, num_layers=1)
    [b] = st.make_batches(seqs, None, np.arange(6), 6, tokenizer.pad_token_id, 48)
    out = m(**b.model_inputs())
    assert out.shape == (6, 4)
    absent = torch.arange(4)[None, :] >= b.n_choices[:, None]
    assert absent.sum() == 1 and torch.isneginf(out[absent]).all() and torch.isfinite(out[~absent]).all()
    probs = st.predict(m, seqs, batch_size=4, pad_id=tokenizer.pad_token_id, max_length=48)
    assert probs.shape == (6, 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and probs[1, 3] == 0
    # Padding does not change a row's logits (right padding + last real token).
    [solo] = st.make_batches(seqs, None, np.array([int(b.questions[0])]), 1, tokenizer.pad_token_id, 48)
    alone = m(**solo.model_inputs())
    assert torch.allclose(alone[0], out[0], atol=1e-4)


def test_few_steps_reduce_loss(shared_data, tokenizer, tiny_model):
    seqs = sequences(shared_data, tokenizer, "per_choice", 16)
    targets = st.one_hot(seqs.answer, seqs.max_choices)
    torch.manual_seed(0)
    m = st.StudentModel.from_pretrained(tiny_model, mode="per_choice", max_choices=seqs.max_choices, num_layers=2)
    opt = st.make_optimizer(m, 2e-3, 0.01)
    sched = st.make_scheduler(opt, 3 * 2)
    kw = dict(soft=True, temperature=2.0, alpha=0.5)
    fixed = st.make_batches(seqs, targets, np.arange(16), 8, tokenizer.pad_token_id, 24)
    before = st.evaluate_loss(m, fixed, **kw)
    for epoch in range(3):
        batches = st.make_batches(
            seqs, targets, np.arange(16), 8, tokenizer.pad_token_id, 24, rng=np.random.default_rng(epoch)
        )
        st.train_epoch(m, batches, opt, sched, **kw)
    after = st.evaluate_loss(m, fixed, **kw)
    assert after < 0.8 * before, (before, after)


def test_shards_cover_all_questions_evenly():
    parts = [st.shard_questions(10, r, 3, seed=1, epoch=2) for r in range(3)]
    assert {len(p) for p in parts} == {4}
    assert set(np.concatenate(parts).tolist()) == set(range(10))
    assert np.array_equal(st.shard_questions(10, 0, 1, seed=1, epoch=2), st.shard_questions(10, 0, 1, seed=1, epoch=2))


# ---------------------------------------------------------------------------------------------
# Ray Train


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-st-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_AUTH_MODE",
                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local node bound to 127.0.0.1
    os.environ["RAY_AUTH_MODE"] = "disabled"
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": repo, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(temp, ignore_errors=True)


def test_train_student_on_ray_and_resume(local_ray, shared_data, tokenizer, tiny_model, tmp_path):
    from cluster.train import train_student

    train = sequences(shared_data, tokenizer, "per_choice", 24)
    test = sequences(shared_data, tokenizer, "per_choice", 16, skip=24)
    targets = st.one_hot(train.answer, train.max_choices) * 0.7 + 0.3 / train.max_choices
    base = {
        "seed": 3,
        "student": {
            "model": "teacher",
            "num_layers": 2,
            "batch_size": 8,
            "max_length": 32,
            "lr": 1e-3,
            "num_workers": 1,
            "cpus_per_worker": 1,
        },
    }
    storage = tmp_path / "students"
    kw = dict(
        source="probe",
        model_dir=str(tiny_model),
        train=train,
        targets=targets,
        test=test,
        pad_id=tokenizer.pad_token_id,
        storage_dir=str(storage),
    )

    first = train_student(from_dict(base, ["student.epochs=1"]), **kw)
    assert first["source"] == "probe" and first["epochs"] == 1 and first["start_epoch"] == 0
    probs = first["test_probs"]
    assert probs.shape == (16, test.max_choices) and probs.dtype == np.float32
    present = np.arange(probs.shape[1])[None, :] < test.n_choices[:, None]
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs[~present] == 0).all()
    assert 0.0 <= first["test_accuracy"] <= 1.0
    assert first["test_accuracy"] == pytest.approx(float((probs.argmax(1) == test.answer).mean()))
    assert first["train_seconds"] > 0 and math.isfinite(first["history"][0]["train_loss"])
    run_dir = storage / "student-probe"
    ckpts = sorted(p.name for p in run_dir.glob("job_*"))
    assert ckpts == ["job_000_epoch_0001"]
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "probs_000.npy"} <= {
        p.name for p in (run_dir / "job_000_epoch_0001").iterdir()
    }

    # Same storage and name, more epochs: Ray Train V2 hands the latest checkpoint to the new run.
    # Two workers this time, so DDP over gloo, sharding and rank-0 prediction are exercised too.
    second = train_student(from_dict(base, ["student.epochs=2", "student.num_workers=2"]), **kw)
    assert second["start_epoch"] == 1 and second["epochs"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    assert sorted(p.name for p in run_dir.glob("job_*")) == ["job_000_epoch_0001", "job_000_epoch_0002"]
    assert second["test_probs"].shape == probs.shape and np.allclose(second["test_probs"].sum(1), 1, atol=1e-5)
    # Each epoch's training time, and how long each checkpoint but the last held the loop (the resumed
    # run's first checkpoint is the first run's last, so neither run recorded one).
    assert [h["seconds"] > 0 for h in second["history"]] == [True, True] and second["report_seconds"] == []
    assert not np.allclose(second["test_probs"], probs)  # epoch 2 changed the weights
    print(f"ray fits: {first['wall_seconds']:.1f}s (1 worker), {second['wall_seconds']:.1f}s (2 workers)")


def test_resume_fingerprint_ignores_epochs_and_resources(shared_data, tokenizer):
    """A resumed run must match its checkpoint in all but epochs and resources (else the worker refuses)."""
    from cluster.train import _fingerprint, pack_sequences, unpack_sequences

    seqs = sequences(shared_data, tokenizer, "per_choice", 5)
    packed = pack_sequences(seqs)
    back = unpack_sequences(packed)
    assert all(np.array_equal(a, b) for a, b in zip(back.ids, seqs.ids, strict=True)) and back.mode == seqs.mode
    targets = st.one_hot(seqs.answer, 4)
    cfg = from_dict({"student": {"epochs": 1}})

    def fp(c=cfg, t=targets, source="gold"):
        return _fingerprint(c.student, c.seed, source, "/m", packed, t, 4, 0)

    assert fp() == fp(from_dict({"student": {"epochs": 5, "num_workers": 3, "cpus_per_worker": 4}}))
    assert fp() != fp(from_dict({"student": {"epochs": 1, "lr": 1e-3}}))
    assert fp() != fp(t=targets[::-1].copy())
    assert fp() != fp(source="probe")


def resume_jobs(model_dir: str):
    """Three students (gold, probe, logit-like soft targets; other seeds and sizes) on the tiny model."""
    from transformers import AutoTokenizer

    from cluster.train import StudentJob
    from tests.conftest import SHARED_DATA

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = sequences(SHARED_DATA, tok, "per_choice", 40)
    test = sequences(SHARED_DATA, tok, "per_choice", 16, skip=40)
    soft = st.one_hot(train.answer, train.max_choices) * 0.6 + 0.4 / train.max_choices
    part = train.select(np.arange(24))
    jobs = [StudentJob("gold", 0, train, st.one_hot(train.answer, train.max_choices)),
            StudentJob("probe", 1, train, soft),
            StudentJob("logit", 2, part, soft[:24])]
    cfg = from_dict({"student": {"num_layers": 2, "epochs": 2, "batch_size": 8, "max_length": 32, "lr": 1e-3,
                                 "num_workers": 1, "cpus_per_worker": 1}})
    return cfg.student, jobs, test, tok.pad_token_id


_KILLED_RUN = """
import sys
sys.path.insert(0, {repo!r})
from cluster import runtime
from cluster.train import train_students
from engine.config import RayConfig
from tests.test_student import resume_jobs
runtime.init(RayConfig(num_cpus=2, temp_dir={temp!r}))
student, jobs, test, pad = resume_jobs({model!r})
train_students(student, jobs, model_dir={model!r}, test=test, pad_id=pad, storage_dir={storage!r}, name="kill")
print("FINISHED", flush=True)
"""


def test_students_killed_mid_run_resume_from_the_last_checkpoint(local_ray, tiny_model, tmp_path):
    """SIGKILL a three-student run (driver, Ray and workers) after two checkpoints; the same call then
    resumes there, and every student ends exactly as in an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from cluster.train import train_students

    repo = str(Path(__file__).resolve().parents[1])
    storage = tmp_path / "killed"
    script = _KILLED_RUN.format(repo=repo, temp=f"/tmp/pkd-kill-{os.getpid()}", model=str(tiny_model),
                                storage=str(storage))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(list((storage / "kill").glob("job_*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert "FINISHED" not in out, "the run ended before it could be killed"
    made = sorted(p.name for p in (storage / "kill").glob("job_*"))
    assert made and made[-1] < "job_002_epoch_0002", made

    student, jobs, test, pad = resume_jobs(str(tiny_model))
    kw = dict(model_dir=str(tiny_model), test=test, pad_id=pad)
    resumed = train_students(student, jobs, storage_dir=str(storage), name="kill", **kw)
    (job, epoch), = resumed[0]["resumes"]
    assert (job, epoch) >= (0, 1), resumed[0]["resumes"]  # started from a checkpoint, not from scratch
    whole = train_students(student, jobs, storage_dir=str(tmp_path / "whole"), name="whole", **kw)
    assert whole[0]["resumes"] == []
    held = whole[0]["report_seconds"]  # 3 jobs x 2 epochs = 6 checkpoints; the last one's hold is not kept
    assert len(held) == 5 and all(0 < s < 60 for s in held), held
    for a, b in zip(resumed, whole, strict=True):
        assert (a["source"], a["seed"], a["epochs"]) == (b["source"], b["seed"], 2)
        assert [h["epoch"] for h in a["history"]] == [1, 2]
        assert np.allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]], atol=1e-5)
        assert np.allclose(a["test_probs"], b["test_probs"], atol=1e-5)
    print(f"killed after {made[-1]}; resumed at job {job}, epoch {epoch}")


def test_resume_point():
    from cluster.train import _resume_point

    assert _resume_point(None, 2, 3) == (0, 0)
    assert _resume_point({"job": 0, "epoch": 1}, 2, 3) == (0, 1)  # the job goes on
    assert _resume_point({"job": 0, "epoch": 2}, 2, 3) == (1, 0)  # the next job starts fresh
    assert _resume_point({"job": 2, "epoch": 2}, 2, 3) == (2, 2)  # all done: results handed on
    assert _resume_point({"job": 0, "epoch": 1}, 3, 1) == (0, 1)  # one job asked for more epochs


def test_a_dead_worker_is_restarted_from_the_last_checkpoint(local_ray, tiny_model, tmp_path):
    """`student.max_failures` reaches Ray Train's FailureConfig: SIGKILL the training worker after its
    second checkpoint; the controller starts a new worker group, which resumes there and finishes."""
    import dataclasses
    import signal
    import threading
    import time

    import psutil
    from ray._private import worker as ray_worker

    from cluster.train import train_students

    student, jobs, test, pad = resume_jobs(str(tiny_model))
    storage, out = tmp_path / "retry", {}

    def fit(max_failures):
        try:
            out["res"] = train_students(dataclasses.replace(student, max_failures=max_failures), jobs,
                                        model_dir=str(tiny_model), test=test, pad_id=pad, storage_dir=str(storage),
                                        name="retry")
        except Exception as err:  # noqa: BLE001 - handed to the test thread
            out["err"] = err

    thread = threading.Thread(target=fit, args=(1,))
    thread.start()
    deadline = time.monotonic() + 600
    while len(list((storage / "retry").glob("job_*"))) < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    # This test's own Ray: the training worker is a child of its raylet (other Ray instances may run here).
    raylet = psutil.Process(ray_worker._global_node.all_processes["raylet"][0].process.pid)
    workers = [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "err" not in out, out.get("err")
    res = out["res"]
    (job, epoch), = res[0]["resumes"]  # one restart, from a checkpoint
    assert (job, epoch) >= (0, 1)
    assert all(r["epochs"] == 2 and 0.0 <= r["test_accuracy"] <= 1.0 for r in res)
