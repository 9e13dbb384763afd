"""The import rule (engine/ never imports ray or vllm) is enforced by ruff's banned-api check."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)


def test_engine_is_clean():
    res = _ruff("check", "--select", "TID251", "engine")
    assert res.returncode == 0, res.stdout


def test_linter_rejects_ray_and_vllm_in_engine():
    bad = REPO / "engine" / "_import_rule_probe.py"
    bad.write_text("import ray\nfrom vllm import LLM\nimport ray.train\n")
    try:
        res = _ruff("check", "--select", "TID251", "--no-cache", str(bad.relative_to(REPO)))
    finally:
        bad.unlink()
    assert res.returncode == 1
    assert res.stdout.count("TID251") == 3, res.stdout


def test_a_student_loads_without_the_store_or_cluster_libraries():
    """Loading and running a trained student (`engine.student_folder`) needs torch and transformers only:
    not zarr (the store), ray, vllm, gguf or datasets, so a serving-only install can use it."""
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('zarr', 'ray', 'vllm', 'gguf', 'datasets'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from engine.student_folder import load_student, predict_examples\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
