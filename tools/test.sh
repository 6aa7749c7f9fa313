#!/usr/bin/env bash
# Set up (with the test extra) and run the test suite: unit, reference and smoke tests, a few minutes on 2 cores.
# Benchmarks (-m bench) and slow checks (-m slow) are excluded by default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
python3 -m pytest -q "$@"
