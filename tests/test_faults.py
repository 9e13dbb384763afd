"""Real faults through the CLI, each ending in one clear line and nothing lost: a second writer on the
same out_dir, Ctrl-C (SIGINT) mid-extraction and mid-training, a full disk (an ENOSPC injected at the
chunk write: mounting a size-limited filesystem needs privileges CI may lack), a chunk whose bytes
changed on disk. Every interrupted run resumes, with the same command, to the uninterrupted result."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_same_store, ctrl_c_reaches_the_child, distill, extract_args

from engine import store


def _one_line(stderr: str, pattern: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("distill:")]
    assert len(lines) == 1, stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _start(args: list[str], err: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=open(err, "w"), text=True, preexec_fn=ctrl_c_reaches_the_child)


def _read_until(proc: subprocess.Popen, needle: str, times: int = 1) -> str:
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        seen += needle in line
        if seen >= times:
            return "".join(lines)
    raise AssertionError(f"{needle!r} seen {seen} times before the run ended:\n" + "".join(lines)[-3000:])


@pytest.mark.slow
def test_second_writer_is_refused_and_sigint_mid_extraction_resumes(tmp_path, tiny_model, extract_reference):
    out, err = tmp_path / "run", tmp_path / "first.err"
    args = extract_args(tiny_model, out)
    first = _start(args, err)
    _read_until(first, "[distill] extract")  # it holds the lock from here on
    second = distill(*args)
    assert second.returncode == 2
    _one_line(second.stderr, rf"in use by pid {first.pid} on \S+ \('distill extract .*', since .*\)\. Wait for it to finish, stop it, "
                             "or use another out_dir")
    _read_until(first, " done by replica ", times=2)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    rest = first.communicate(timeout=120)[0]
    assert first.returncode == 130, rest[-2000:]
    line = _one_line(err.read_text(), r"^distill: interrupted\. Kept: .*activations\.zarr\.partial \(\d+/\d+ chunks "
                                      r"done\)\. To continue: distill extract configs/tiny\.yaml")
    part = store.partial_path(out / "activations.zarr")
    assert part.exists() and not (out / "activations.zarr").exists()
    assert json.loads((out / ".distill.lock").read_text() or "{}") == {}  # released

    again = line.split("To continue: ")[1]
    resumed = subprocess.run([sys.executable, "-m", "cluster.cli", *again.split()[1:]], cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(out / "activations.zarr", extract_reference)


@pytest.mark.slow
def test_disk_full_mid_extraction_then_resume(tmp_path, tiny_model, extract_reference):
    out = tmp_path / "run"
    full = distill(*extract_args(tiny_model, out), env={**os.environ, store.INJECT_ENOSPC: "train:1"})
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
    _one_line(full.stderr, r"^distill: disk full writing \S+activations\.zarr\.partial/train/activations \(No space "
                           r"left on device\)\. Free space .* Kept: \S+activations\.zarr\.partial \(\d+/\d+ chunks "
                           r"done\)\. To continue: distill extract configs/tiny\.yaml")
    resumed = distill(*extract_args(tiny_model, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(out / "activations.zarr", extract_reference)


def test_a_corrupt_chunk_is_named_by_verify_and_by_the_probe_stage(tmp_path, tiny_model, extract_reference):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(extract_reference, out / "activations.zarr")
    ok = distill("verify", str(out))
    assert ok.returncode == 0 and re.search(r"^ok +store .*every chunk's checksum matches", ok.stdout, re.M), ok.stdout
    chunk = out / "activations.zarr" / "train" / "activations" / "c" / "2" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100:108] = b"\xff" * 8
    chunk.write_bytes(bytes(data))

    bad = distill("verify", str(out))
    assert bad.returncode == 1
    assert re.search(r"^BAD +store .*activations\.zarr: split train array activations chunk c/2/1/0 is corrupt "
                     r"\(Stored and computed checksum do not match\)", bad.stdout, re.M), bad.stdout
    assert "1 checked, 1 damaged" in bad.stdout
    probe = distill("probe", *extract_args(tiny_model, out)[1:])
    assert probe.returncode == 2, probe.stderr[-3000:]
    _one_line(probe.stderr, r"activations\.zarr: array train/activations chunk c/2/1/0 is corrupt .*Run `distill "
                            r"verify`")
    assert not list(out.glob("probes-*"))
    # Nothing written but the run's log, which says how it ended: the store, the lock file, logs/.
    assert sorted(p.name for p in out.iterdir()) == [".distill.lock", "activations.zarr", "logs"]
    (log_file,) = (out / "logs").iterdir()
    logged = log_file.read_text()
    assert "STOPPED " in logged and "chunk c/2/1/0 is corrupt" in logged.split("STOPPED ", 1)[1]


def _students(out: Path) -> dict[str, dict]:
    found = {}
    for d in sorted((out / "students").iterdir()):
        meta = json.loads((d / "meta.json").read_text())
        found[meta["source"]] = {"test_acc": meta["test_acc"], "best_epoch": meta["best_epoch"],
                                 "history": [h["val_acc"] for h in meta["history"]],
                                 "test_probs": np.load(d / "test_probs.npy")}
    return found


@pytest.mark.slow
def test_sigint_mid_training_resumes_to_the_uninterrupted_students(tmp_path, tiny_model):
    def args(out: Path) -> list[str]:
        return ["run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "student.epochs=2",
                "baseline.enabled=false", f"ray.temp_dir=/tmp/pkd-sigint-{os.getpid()}"]

    out, err = tmp_path / "stopped", tmp_path / "stopped.err"
    first = _start(args(out), err)
    _read_until(first, "epoch 1/2")  # the first student's first epoch is checkpointed
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == 130, err.read_text()[-3000:]
    _one_line(err.read_text(), r"^distill: interrupted\. Kept: \S+activations\.zarr \(complete\); \d+ committed "
                               r"artifacts?\. To continue: distill run configs/tiny\.yaml")
    assert not (out / "students").exists() or len(list((out / "students").iterdir())) < 3

    resumed = distill(*args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resum" in resumed.stdout.lower(), resumed.stdout[-3000:]
    whole = distill(*args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = _students(out), _students(tmp_path / "whole")
    assert sorted(a) == sorted(b) == ["gold", "logit", "probe"]
    for source in a:
        assert a[source]["best_epoch"] == b[source]["best_epoch"], source
        np.testing.assert_allclose(a[source]["history"], b[source]["history"])
        np.testing.assert_allclose(a[source]["test_probs"], b[source]["test_probs"], atol=1e-5)


@pytest.mark.slow
def test_a_teacher_file_that_vanishes_mid_run(tmp_path, tiny_model, extract_reference):
    """The teacher's weights vanish mid-extraction and its replica dies: the replacement cannot load them.
    One line names the file; with the file back, the same command resumes to the uninterrupted store."""
    model = tmp_path / "teacher"
    shutil.copytree(tiny_model, model)
    out, err = tmp_path / "run", tmp_path / "vanish.err"
    args = extract_args(model, out)
    proc = _start(args, err)
    _read_until(proc, " done by replica ", times=2)
    weights = next(model.glob("*.safetensors"))
    away = weights.rename(weights.with_name("elsewhere.bin"))
    pids = subprocess.run(["pgrep", "-f", "TeacherActor"], capture_output=True, text=True).stdout.split()
    assert pids, "no replica process found"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == 1, err.read_text()[-3000:]
    _one_line(err.read_text(), rf"^distill: {re.escape(str(weights))} vanished mid-run .*Restore it.* Kept: .*"
                               r"activations\.zarr\.partial \(\d+/\d+ chunks done\)\. To continue: distill extract")
    away.rename(weights)
    resumed = distill(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(out / "activations.zarr", extract_reference)


_HEAD = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], _node_ip_address="127.0.0.1")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""

_JOIN = """
import sys
from cluster import runtime
from engine.config import RayConfig
import ray
runtime.init(RayConfig(num_cpus=2, temp_dir=sys.argv[1]))
print("GCS", ray.get_runtime_context().gcs_address, "CPU", ray.cluster_resources().get("CPU"), flush=True)
runtime.shutdown()
"""


def test_ray_address_in_the_environment_does_not_capture_a_local_run():
    """RAY_ADDRESS set (here: a running local cluster's) with ray.address null: the run starts its own
    local Ray with its own CPUs, and says so; Ray would otherwise join that cluster and refuse num_cpus."""
    short = f"/tmp/pkd-addr-{os.getpid()}"  # Ray's AF_UNIX socket paths must stay short
    head = subprocess.Popen([sys.executable, "-c", _HEAD, f"{short}-head"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
        env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": REPO}
        out = subprocess.run([sys.executable, "-c", _JOIN, f"{short}-own"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"RAY_ADDRESS={address} is set, but ray.address is null: starting a local Ray" in out.stdout
        gcs, cpus = re.search(r"GCS (\S+) CPU (\S+)", out.stdout).groups()
        assert gcs != address and float(cpus) == 2.0
    finally:
        head.stdin.close()  # the head shuts its Ray down
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for d in (f"{short}-head", f"{short}-own"):
            shutil.rmtree(d, ignore_errors=True)


def test_a_local_ray_runs_no_preemption_watcher(monkeypatch, tmp_path):
    """One machine is never preempted: a local Ray's workers (Ray Train's controller among them) get
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0; a cluster's (ray.address set) keep Ray's default."""
    import ray

    from cluster import runtime
    from engine.config import RayConfig

    seen = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw["runtime_env"]["env_vars"]))
    runtime._init(RayConfig(temp_dir=str(tmp_path)))
    runtime._init(RayConfig(address="ray://example:10001"))
    assert seen[0]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in seen[1]


_NICE = """
import os, sys
from cluster import runtime
from engine.config import RayConfig
import ray
runtime.init(RayConfig(num_cpus=1, temp_dir=sys.argv[1]))
print("DRIVER", os.nice(0), "WORKER", ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True)
runtime.shutdown()
"""


def test_a_local_rays_workers_run_at_the_drivers_priority(tmp_path):
    """Ray starts workers at nice 15, below its own daemons; on a few cores the students' worker then
    loses its core whenever one of them wakes. A local Ray starts them at the driver's priority."""
    temp = Path("/tmp") / f"rk-nice-{os.getpid()}"
    try:
        res = subprocess.run([sys.executable, "-c", _NICE, str(temp)], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    found = re.search(r"DRIVER (-?\d+) WORKER (-?\d+)", res.stdout)
    assert found, res.stdout[-2000:] + res.stderr[-2000:]
    assert found.group(1) == found.group(2)


_KEEP = """
import numpy as np
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
a = np.ones(200 << 20, dtype=np.uint8)
del a
print("KEPT", rss() > (150 << 20), flush=True)
"""


def test_cpu_train_workers_keep_the_memory_they_free(tmp_path):
    """Ray Train workers on CPU start with glibc settings that keep freed memory in the process (no fresh
    zeroed pages every step); GPU workers do not. The settings do what they say in a fresh process: a
    freed 200 MB buffer stays resident with them and goes back to the OS without."""
    from cluster.train import _trainer, train_worker_env
    from engine.config import StudentConfig

    cpu = _trainer(StudentConfig(), {}, str(tmp_path), "cpu", None).run_config.worker_runtime_env["env_vars"]
    gpu = _trainer(StudentConfig(use_gpu=True), {}, str(tmp_path), "gpu", None).run_config.worker_runtime_env["env_vars"]
    assert cpu == train_worker_env(False) and gpu == train_worker_env(True)
    keep = {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"}
    assert keep <= set(cpu) and not keep & set(gpu)
    assert cpu["MALLOC_ARENA_MAX"] == gpu["MALLOC_ARENA_MAX"] == "1" and cpu["OMP_NUM_THREADS"] == "1"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept = [subprocess.run([sys.executable, "-c", _KEEP], env={**base, **env}, capture_output=True, text=True,
                           timeout=120).stdout.strip() for env in (cpu, gpu)]
    assert kept == ["KEPT True", "KEPT False"]
