"""Ray runtime: a local Ray bound to 127.0.0.1 with its own temp dir, or an existing cluster."""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import RayConfig
from engine.log import WARNING, log

REPO = str(Path(__file__).resolve().parents[1])

# Set before ray is imported anywhere in this process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # makes a local node bind to 127.0.0.1
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars from every worker
# Ray Train tees a worker's print() to stdout and to its logger, so the driver showed every line twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}
"""glibc settings for a worker process that computes in a thread other than its main one (Ray Train's
loop, a threaded actor's methods): glibc gives such a thread a malloc arena of its own, made of 64 MB
heaps that it trims back to the OS eagerly, so each step's buffers were unmapped and faulted back in
(zeroed pages). In a Ray Train worker that ran at 1.5-1.8 of its 2 cores, its first epoch 21-28 s against
14-15 s plain; with the one (main) arena, as a plain loop in a main thread has, 12-15 s
(`bench/results/student.json` of that time)."""

KEEP_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": str(64 << 20)}
"""glibc settings for a worker process that computes on CPU: keep the memory it frees. No `mmap` for
large blocks and no trimming of the heap, which grows 64 MB at a time; each step's activations are then
carved from pages the process already has, instead of fresh zeroed pages the kernel must fault in (and a
VM's host back) every step. The process holds its peak until it exits. Measured in alternating runs:
Ray Train's worker, second epochs 11.8-12.4 s against 12.2-12.9 s, third 11.0-11.2 s against 11.5-12.0 s
(`bench/results/student_xeon/keep_memory_ab.json`); a teacher replica, 1811-1955 tok/s against 1710-1812
(`bench/results/extract_keep_memory_ab.json`); the vLLM scorer, 1603-1928 tok/s against 1421-1506
(`bench/results/baseline_keep_memory_ab.json`). Not for GPU workers, whose host memory is only a
passage (a model loaded there would stay held after it moved to the GPU)."""


def compute_env(gpu: bool, *, one_arena: bool = True) -> dict[str, str]:
    """glibc settings a compute worker starts with (read at start-up): `ONE_ARENA_ENV` where it works in
    a thread of its own, and on CPU `KEEP_MEMORY_ENV`."""
    return {**(ONE_ARENA_ENV if one_arena else {}), **({} if gpu else KEEP_MEMORY_ENV)}


def as_cpu_worker() -> None:
    """Re-execute this process (a bench script, same arguments) under the glibc settings a CPU teacher
    replica starts with (`compute_env(False)`), unless it has them already: its timings then measure the
    forward as the engine runs it, not the faulting-in of fresh pages."""
    import sys

    want = compute_env(False)
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


def malloc_settings() -> dict[str, str]:
    """The glibc malloc settings this process runs with (recorded by workers that got `compute_env`)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: the repo on the path and quiet, bounded threading."""
    keep = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH", "TOKENIZERS_PARALLELISM",
            "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return env


def quiet_local_workers() -> None:
    """`worker_process_setup_hook` of a local Ray: it runs without the dashboard, so Ray Train's
    placement-group cleaner cannot reach the State API and would warn once a second for the whole run.
    (Its job, freeing a dead controller's resources, is moot here: the local Ray ends with the job.)"""
    import logging

    import ray

    # With two local Rays on one machine (two runs in two out_dirs), a worker that auto-detects "its"
    # cluster finds both and fails with a traceback; name this worker's own.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init(cfg: RayConfig) -> None:
    """Start (or join) Ray once per process; a failure to do so is one RayStartError."""
    import ray

    from cluster.failures import RayStartError

    if ray.is_initialized():
        return
    try:
        _init(cfg)
    except (ConnectionError, RuntimeError, OSError, ValueError, TimeoutError) as err:
        where = f"at ray.address={cfg.address}" if cfg.address else f"locally (ray.temp_dir={cfg.temp_dir})"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RayStartError(f"{where}: {first}. Check that address (or that nothing else holds Ray's ports), "
                            "then rerun") from err


def _init(cfg: RayConfig) -> None:
    import ray

    runtime_env = {"env_vars": worker_env()}
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
        return
    Path(cfg.temp_dir).mkdir(parents=True, exist_ok=True)
    runtime_env["worker_process_setup_hook"] = "cluster.runtime.quiet_local_workers"
    # One machine is never preempted: no watcher actor (its start costs CPU-seconds at every fit(),
    # and Ray core prints an error-looking line about its constructor arguments).
    runtime_env["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # ray.address null means a local Ray. An inherited RAY_ADDRESS would make ray.init join that cluster
    # instead, and refuse the local resources passed here: "local" starts one whatever the environment says.
    inherited = os.environ.pop("RAY_ADDRESS", None)
    if inherited:
        log("ray", f"RAY_ADDRESS={inherited} is set, but ray.address is null: starting a local Ray. "
                   "To use that cluster, set ray.address=auto", WARNING)
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        _temp_dir=cfg.temp_dir,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        logging_level="WARNING",
        # Ray starts its workers at nice 15, below its own daemons (raylet, GCS) and the driver. On a machine
        # of a few cores, the students' Ray Train worker then yields a core whenever any of those wakes,
        # and its other OpenMP thread spins at the next barrier. Our Ray is the job: workers at the
        # driver's priority (`bench/student.py`).
        _system_config={"worker_niceness": 0},
    )


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
