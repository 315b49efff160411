"""The project's FSDP route: FSDP2 (`fully_shard`) through Lightning's `ModelParallelStrategy`, on GPUs and CPUs.

`trainer.strategy=fsdp` builds `FSDPStrategy`: Lightning's `ModelParallelStrategy` with one data-parallel mesh
dimension over every process (no tensor parallelism). The module's `configure_model` hook shards the policy (and
the KL reference) with torch's `fully_shard`: every decoder layer is one unit, the transformer the root (a model
without transformers' `_no_split_modules` is one unit). The LightningModule itself is never wrapped, so
`manual_backward` inside `training_step` is an ordinary backward, which Lightning's FSDP1 `FSDPStrategy` cannot
give (it runs `training_step` inside the wrapped root's forward). Parameters stay DTensors with their logical
shapes and names, so name-based weight decay, `clip_grad_norm_` (a global norm) and full state dicts work as
without sharding. The same code path runs on CPU with gloo. The accepted strategies and precisions are listed in
`config_checks` (STRATEGIES, PRECISIONS).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from kpo_lightning.models.sharding import shard_model


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (gloo on CPU, NCCL on GPU), checkpoints written as one full file by rank 0.

    One file keeps checkpoints loadable by `export.load_policy_weights` and resumable on any number of processes;
    the price is that rank 0 gathers the full weights and optimizer state in CPU memory while saving.
    """

    strategy_name = "kpo_fsdp"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # Pure data parallelism: every process is one shard of the data-parallel dimension.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """Apply `fully_shard` to `model` (idempotent: a sharded model is returned as it is); `frozen` for a model
        that never runs backward (the KL reference; see `shard_model`)."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        return shard_model(model, self.device_mesh["data_parallel"], precision, frozen=frozen)
