"""kpo-lightning: KPO (Kalman-filtered policy optimisation, arXiv 2602.10609) for LLM fine-tuning on Lightning.

Names are imported lazily, so `import kpo_lightning.kalman` (plain tensor math) does not pull in Lightning.
"""

import importlib

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_EXPORTS = {
    "Config": "config",
    "DataConfig": "config",
    "EvalConfig": "config",
    "LossConfig": "config",
    "OptimConfig": "config",
    "RewardConfig": "config",
    "RolloutConfig": "config",
    "ModelConfig": "config",
    "KPOModule": "module",
    "PromptDataModule": "datamodule",
    "RolloutCallback": "rollout_callback",
    "RolloutCheckpoint": "checkpointing",
    "causal_kalman_filter": "kalman",
    "compute_policy_loss": "losses",
    "group_advantages": "advantages",
    "load_model_and_tokenizer": "models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kpo_lightning.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kpo_lightning' has no attribute {name!r}")
