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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

MIXED_PRECISIONS = ("bf16-mixed",)


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

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply `fully_shard` to `model` (idempotent: a sharded model is returned as it is)."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        return shard_model(model, self.device_mesh["data_parallel"], precision)


def _mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in MIXED_PRECISIONS:
        # float32 master shards; bfloat16 all-gathers and compute; gradients reduced in float32.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the transformer blocks (transformers' `_no_split_modules`, also under a peft wrapper)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def is_sharded(model: torch.nn.Module) -> bool:
    """Does `model` hold FSDP-sharded modules (itself, or the transformer inside a peft wrapper)?"""
    return bool(fsdp_modules(model))


def shard_model(model: torch.nn.Module, mesh, precision: str) -> torch.nn.Module:
    """`fully_shard` each transformer block, then the whole transformer (the root: embeddings, head, final norm).

    Under peft the root is the transformer inside the wrapper (`get_base_model()`): `generate` calls that model's
    forward directly, and FSDP needs every forward to enter through its root. Every unit reshards after its
    forward (memory first); `full_weights_for_generation` turns that off while sampling. Returns `model`.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    policy = _mixed_precision_policy(precision)
    classes = _layer_classes(root)
    for module in list(root.modules()):
        if module is not root and type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather the full weights of a sharded model once (collective: every process must enter), keep them through
    any number of forwards (no collective inside, so processes may run different numbers of them, as `generate`
    does when their sequences stop at different lengths), then reshard."""
    modules = fsdp_modules(model)
    for m in modules:
        m.unshard()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU for rank 0 (a collective under sharding); the plain state dict when the
    model is not sharded. Other ranks get an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
