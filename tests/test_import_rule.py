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
