#!/usr/bin/env bash
# Install what is needed (Python packages, Debian chromium for the browser test), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
      >/dev/null || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium missing and not root; the browser test will be skipped" >&2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -ra "$@"
