#!/usr/bin/env bash
# The paper recipe on a tiny random Qwen3, 2 rollout steps per variant (1 GPU, FSDP on 1 and 2 GPUs, LoRA,
# gradient checkpointing): loss, grad norm, tokens/s, peak GPU memory. Exits 0 with a message on a CPU-only
# machine; `--cpu` runs the same variants on CPU processes (gloo). See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
