"""Training with Lightning: `KPOModule` (policy, reference snapshot, Kalman-filtered loss, manual optimisation;
`module`), the FSDP2 strategy (`strategies`), rollout-step checkpoints and resume (`checkpointing`) and the ratio
figure logged to TensorBoard (`plots`).

Layer 4, above every other sub-package but `cli`.
"""
