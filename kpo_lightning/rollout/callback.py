"""`RolloutCallback`: before each training step, sample the rollout the step will optimise on.

What the callback reads from the LightningModule is one method, `rollout_inputs() -> RolloutInputs` (the
`RolloutSource` protocol): the engine, policy, tokenizer, reward function, training sampling settings, advantage
estimator and the (seed, rank, step) the sampling seed is derived from. `KPOModule` implements it; the callback
touches nothing else of the module.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import lightning.pytorch as pl

from kpo_lightning.rollout.engine import RolloutEngine, SamplingParams, make_rollout, sampling_seed
from kpo_lightning.rollout.sharded_generation import full_weights_for_generation


@dataclass(frozen=True)
class RolloutInputs:
    """Everything `RolloutCallback` takes from the module to sample one step's rollout."""

    engine: RolloutEngine
    policy: Any  # the model to sample from (torch.nn.Module)
    tokenizer: Any
    reward_fn: Callable[..., float]
    params: SamplingParams  # the training sampling settings (their seed is replaced per process and step)
    advantage_estimator: str  # see kpo_lightning.algorithms.advantages
    seed: int  # the run's seed
    global_rank: int
    rollout_step: int  # rollout steps done so far


class RolloutSource(Protocol):
    """The module side of `RolloutCallback` (KPOModule implements it)."""

    def rollout_inputs(self) -> RolloutInputs: ...


class RolloutCallback(pl.Callback):
    """Generates `rollout.num_generations` samples per prompt of the batch, scores them, computes group
    advantages and puts the result into the batch under "rollout" for `KPOModule.training_step`.

    The engine, reward function and sampling settings come from the module's `rollout_inputs()` (one source of
    truth, shared with validation); pass `params` to override the sampling settings here. Either way the rollout
    records the settings it was sampled with, and the module computes its log-probs from those (temperature,
    group size).

    Each process samples with the seed `sampling_seed(seed, global_rank, rollout_step)` (any `seed` in `params`
    is replaced): processes draw different rollouts, and a resumed run draws the same ones as an uninterrupted run.

    Sampling runs in the training precision, like validation: under bf16-mixed with bfloat16 weights, activations
    and KV cache (see `sharded_generation.full_weights_for_generation`), under FSDP with the gathered weights.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params

    def sampling_params(self, inputs: RolloutInputs) -> SamplingParams:
        """This step's settings: `params` (or the module's training settings) with this process's step seed."""
        params = self.params if self.params is not None else inputs.params
        return replace(params, seed=sampling_seed(inputs.seed, inputs.global_rank, inputs.rollout_step))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: RolloutSource, batch: dict, batch_idx: int) -> None:
        inputs = pl_module.rollout_inputs()
        # This hook runs outside Lightning's step contexts: enter the precision's forward context (autocast under
        # bf16-mixed) as training and validation steps do, with the weights validation samples with.
        precision = trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()
        with precision, full_weights_for_generation(trainer, inputs.policy):
            batch["rollout"] = self._make(inputs, batch)

    def _make(self, inputs: RolloutInputs, batch: dict):
        return make_rollout(
            inputs.engine,
            inputs.policy,
            inputs.tokenizer,
            batch["prompt"],
            batch["answer"],
            self.sampling_params(inputs),
            inputs.reward_fn,
            inputs.advantage_estimator,
        )
