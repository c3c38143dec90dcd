#!/usr/bin/env bash
# The issue-19 GPU check: at most 8 minutes on one GPU, offline (no pip, no hub), JSON out.
#   benchmarks/gpu_check.sh [OUT.json]     # default: $OUT/gpu_check.json
# Run from anywhere; it runs from the repository root with torch, torchvision and timm installed.
# The driver keeps to a 440 s budget and writes the JSON after every section; `timeout` is the
# hard stop at 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-${OUT:-.}/gpu_check.json}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout --kill-after=10 470 python benchmarks/gpu_check.py "$target"
