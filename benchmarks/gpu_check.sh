#!/usr/bin/env bash
# GPU check for a CUDA machine (docs/performance.md, "GPU check"): AMP bf16/fp16, channels_last,
# torch.compile, 2-GPU DDP with nccl (when 2 GPUs exist), trainer vs minimal-loop throughput at
# ResNet-50/224 px. Arguments go to benchmarks/gpu_check.py (--quick, --skip, --out, ...).
# Exit status: 0 = every check that ran passed, 1 = a check failed, 77 = no CUDA device (skipped).
# CI never runs it.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
