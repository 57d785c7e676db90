#!/usr/bin/env bash
# The GPU check: run on a GPU machine after `docker build -f docker/Dockerfile .` (inside the image) or in the GPU venv.
#   scripts/gpu_check.sh                          # every check; report in build/gpu_check.json; exit 1 on any mismatch
#   scripts/gpu_check.sh --allow-missing vllm     # a machine without vLLM: its check is reported `missing`, not failed
#   scripts/gpu_check.sh --cpu                    # the CPU-runnable parts (what CI runs: tests/test_gpu_check.py)
# What each check compares and its tolerance: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 600 "$PY" scripts/gpu_check.py "$@"
