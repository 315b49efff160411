#!/usr/bin/env bash
# The paper recipe on a random Qwen3-0.6B-sized model with Qwen3's 151,936-token vocabulary, 2 rollout steps per
# variant (1 GPU, FSDP on 1 and 2 GPUs, LoRA, gradient checkpointing): loss, grad norm, tokens/s, the measured peak
# GPU memory (validation and generation included) next to `run.py --plan`'s prediction. Exit 1 on a failure, a
# non-finite loss or grad norm, a skipped step or a peak above the plan by more than 10%. Exits 0 with a message on
# a CPU-only machine; `--cpu` runs the same variants (small model) on CPU processes (gloo). See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
