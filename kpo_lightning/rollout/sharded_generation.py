"""The weights `generate` runs with: the full weights under sharding, bfloat16 weights under bf16-mixed.

Under `trainer.strategy=fsdp` (FSDP2, kpo_lightning/models/sharding.py) each process holds a shard of every weight;
`generate` runs many forwards, and processes whose sequences stop at different lengths keep each other in step
(transformers turns on `synced_gpus` for an FSDP model: one all-reduce per decoding step, dummy forwards once a
process is done), so gathering per forward would cost one all-gather per unit per token. The weights are gathered
once on entry (bfloat16 under bf16-mixed: FSDP's
mixed-precision policy) and kept until exit. Every process must enter (it is a collective).

Without sharding, under `bf16-mixed` the policy holds float32 master weights, and autocast alone is not enough for
sampling: it runs the matmuls in bfloat16 but the residual stream, the inputs of every projection and so the KV
cache stay float32 (twice the cache). So the floating-point parameters are cast to bfloat16 for the duration of
`generate` (the float32 masters kept aside, the same Parameter objects put back on exit: the optimizer's state is
untouched). Generation then runs as it does under FSDP's bf16-mixed: bfloat16 weights, activations and cache.
Under 32-true and bf16-true the weights are used as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from kpo_lightning.models.sharding import MIXED_PRECISIONS, is_sharded, unsharded


@contextmanager
def parameters_cast(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Floating-point parameters of `model` in `dtype` inside the block, their original tensors back on exit.

    Buffers (rotary frequencies) keep their dtype, as under FSDP's mixed-precision policy. Peak extra memory: the
    `dtype` copy of the weights (2 bytes per parameter for bfloat16), not a second model.
    """
    saved = []
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                saved.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def full_weights_for_generation(trainer, policy) -> AbstractContextManager:
    """The weights to sample with under `trainer`'s strategy and precision (see the module docstring)."""
    if is_sharded(policy):
        return unsharded(policy)
    if trainer is not None and str(getattr(trainer, "precision", "")) in MIXED_PRECISIONS:
        return parameters_cast(policy, torch.bfloat16)
    return nullcontext()
