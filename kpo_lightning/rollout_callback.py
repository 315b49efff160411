"""`RolloutCallback`: before each training step, sample the rollout the step will optimise on."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl

from kpo_lightning.rollout import SamplingParams, make_rollout
from kpo_lightning.sharded_generation import full_weights_for_generation


class RolloutCallback(pl.Callback):
    """Generates `rollout.num_generations` samples per prompt of the batch, scores them, computes group
    advantages and puts the result into the batch under "rollout" for `KPOModule.training_step`.

    The engine, reward function and sampling settings come from the module (one source of truth, shared with
    validation); pass `params` to override the sampling settings here.
    """

    def __init__(self, params: Optional[SamplingParams] = None) -> None:
        self.params = params

    def sampling_params(self, pl_module) -> SamplingParams:
        if self.params is not None:
            return self.params
        return SamplingParams.for_training(pl_module.rollout_cfg)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch: dict, batch_idx: int) -> None:
        with full_weights_for_generation(trainer, pl_module.policy):
            batch["rollout"] = self._make(pl_module, batch)

    def _make(self, pl_module, batch: dict):
        return make_rollout(
            pl_module.engine,
            pl_module.policy,
            pl_module.tokenizer,
            batch["prompt"],
            batch["answer"],
            self.sampling_params(pl_module),
            pl_module.reward_fn,
            pl_module.loss_cfg.advantage,
        )
