"""FSDP2 (`fully_shard`) for a transformers model, in plain torch: shard, ask whether sharded, gather for sampling,
gather a full state dict. The Lightning strategy that calls these is `kpo_lightning.training.strategies`.

Every decoder layer is one unit and the transformer the root (a model without transformers' `_no_split_modules` is
one unit). Parameters stay DTensors with their logical shapes and names, so name-based weight decay,
`clip_grad_norm_` (a global norm) and full state dicts work as without sharding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch

MIXED_PRECISIONS = ("bf16-mixed",)
# Each FSDP unit's reshard-after-forward choice (FSDP2 has no getter), restored after `unsharded`.
_RESHARD_AFTER_FORWARD: WeakKeyDictionary[torch.nn.Module, bool] = WeakKeyDictionary()


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


def shard_model(model: torch.nn.Module, mesh, precision: str, frozen: bool = False) -> torch.nn.Module:
    """`fully_shard` each transformer block, then the whole transformer (the root: embeddings, head, final norm).

    Under peft the root is the transformer inside the wrapper (`get_base_model()`): `generate` calls that model's
    forward directly, and FSDP needs every forward to enter through its root. Every block reshards after its
    forward (memory first). The root keeps FSDP2's default: not resharded after forward, since backward needs its
    weights (Qwen3's tied embedding among them) right after the last block and reshards them itself; gathering
    them again would only add traffic. A `frozen` model (the KL reference) never runs backward, so its root
    reshards after forward too. `full_weights_for_generation` keeps every unit gathered while sampling.
    Returns `model`.
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
            _RESHARD_AFTER_FORWARD[module] = True
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
    _RESHARD_AFTER_FORWARD[root] = frozen
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
        for m in modules:  # back to what shard_model chose (the root: not after forward), all resharded now
            m.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.get(m, True), recurse=False)
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU for rank 0 (a collective under sharding); the plain state dict when the
    model is not sharded. Other ranks get an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
