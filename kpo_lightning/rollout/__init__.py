"""Sampling: the rollout engine (`engine`: exact sampling with `generate`, rewards, advantages), the Lightning
callback that samples before each step (`callback`), full weights gathered once for sampling under FSDP
(`sharded_generation`), and avg@k / pass@k evaluation (`evaluation`).

Layer 3, above `algorithms`, `rewards`, `models` and `data`; below `training`. Only `callback` imports Lightning.
"""
