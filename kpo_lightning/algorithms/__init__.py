"""The math of KPO and its baselines, as plain functions on tensors: the causal Kalman filter (`kalman`), the policy
losses (`losses`), group advantages (`advantages`), token log-probs (`logprobs`, `sequence_logprobs`), the ratio
diagnostics (`metrics`, torchmetrics), the rule that combines a step's logged values over processes
(`step_logs`) and the memory plan, bytes per process from a model config's shapes (`memory_plan`).

Bottom layer: imports torch, torchmetrics and `kpo_lightning.config` / `kpo_lightning.errors` only; never Lightning
and no other sub-package (a test reads the import graph).
"""
