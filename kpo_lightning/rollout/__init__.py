"""Sampling: the rollout engine (`engine`: exact sampling with `generate`, rewards, advantages), the Lightning
callback that samples before each step (`callback`), the weights sampling runs with (`sharded_generation`: gathered
once under FSDP, cast to bfloat16 under bf16-mixed), and avg@k / pass@k evaluation (`evaluation`).

Layer 3, above `algorithms`, `rewards`, `models` and `data`; below `training`. Only `callback` imports Lightning.
"""
