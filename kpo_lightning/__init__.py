"""kpo-lightning: KPO (Kalman-filtered policy optimisation, arXiv 2602.10609) for LLM fine-tuning on Lightning.

Every public name is importable from here (`from kpo_lightning import KPOModule, causal_kalman_filter`); names are
imported lazily, so `import kpo_lightning.algorithms.kalman` (plain tensor math) does not pull in Lightning. The
sub-packages are layers, bottom to top: `config`/`errors`, then `algorithms`, `models`, `rewards`, then `data`,
`rollout`, `training`, `cli`; each `__init__` says what lives there.
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
    "KPOModule": "training.module",
    "PromptDataModule": "data.datamodule",
    "RolloutCallback": "rollout.callback",
    "RolloutCheckpoint": "training.checkpointing",
    "causal_kalman_filter": "algorithms.kalman",
    "compute_policy_loss": "algorithms.losses",
    "group_advantages": "algorithms.advantages",
    "load_model_and_tokenizer": "models.loading",
    "kalman_filter_reference": "algorithms.kalman",
    "token_logprobs": "algorithms.logprobs",
    "sequence_logprobs": "algorithms.sequence_logprobs",
    "RatioMean": "algorithms.metrics",
    "RatioVariance": "algorithms.metrics",
    "SwitchFrequency": "algorithms.metrics",
    "load_reward_fn": "rewards.scoring",
    "math_reward_fn": "rewards.scoring",
    "reward_from_config": "rewards.scoring",
    "score_completions": "rewards.scoring",
    "TimedReward": "rewards.scoring",
    "HFGenerateEngine": "rollout.engine",
    "RolloutEngine": "rollout.engine",
    "FSDPStrategy": "training.strategies",
    "load_policy_weights": "models.export",
    "save_hf_folder": "models.export",
    "load_config": "cli.config_loading",
    "check_config": "cli.config_checks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kpo_lightning.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kpo_lightning' has no attribute {name!r}")
