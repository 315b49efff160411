"""`RolloutCallback`: before each training step, sample the rollout the step will optimise on."""

from __future__ import annotations

from dataclasses import replace

import lightning.pytorch as pl

from kpo_lightning.rollout import SamplingParams, make_rollout, sampling_seed
from kpo_lightning.sharded_generation import full_weights_for_generation


class RolloutCallback(pl.Callback):
    """Generates `rollout.num_generations` samples per prompt of the batch, scores them, computes group
    advantages and puts the result into the batch under "rollout" for `KPOModule.training_step`.

    The engine, reward function and sampling settings come from the module (one source of truth, shared with
    validation); pass `params` to override the sampling settings here. Either way the rollout records the
    settings it was sampled with, and the module computes its log-probs from those (temperature, group size).

    Each process samples with the seed `sampling_seed(module.seed, global_rank, rollout_step)` (any `seed` in
    `params` is replaced): processes draw different rollouts, and a resumed run draws the same ones as an
    uninterrupted run.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params

    def sampling_params(self, pl_module) -> SamplingParams:
        """This step's settings: `params` (or the module's training settings) with this process's step seed."""
        params = self.params if self.params is not None else SamplingParams.for_training(pl_module.rollout_cfg)
        return replace(params, seed=sampling_seed(pl_module.seed, pl_module.global_rank, pl_module.rollout_step))

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
