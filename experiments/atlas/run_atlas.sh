#!/usr/bin/env bash
# The expert atlas of runs/default on 2 threads, timed, with the machine's load before and after.
# Usage: bash experiments/atlas/run_atlas.sh [TAG]   (writes experiments/atlas/results/atlas_default[_TAG].json
# and a .timing.txt beside it; the atlas is also stored in runs/default/atlas.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:+_$1}
out=experiments/atlas/results/atlas_default${tag}.json
{ echo "before: $(uptime)"; nproc; } > "${out%.json}.timing.txt"
start=$(date +%s.%N)
HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m factorlab -v atlas default --threads 2 --json "$out"
end=$(date +%s.%N)
{ echo "after: $(uptime)"; echo "wall seconds (process, model load included): $(echo "$end - $start" | bc)"; } \
  >> "${out%.json}.timing.txt"
cat "${out%.json}.timing.txt"
