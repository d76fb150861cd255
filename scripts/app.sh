#!/usr/bin/env bash
# Install what is needed, then serve the lab at http://127.0.0.1:7860 on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
