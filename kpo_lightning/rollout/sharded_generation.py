"""Generation under sharding: gather the full weights once for the duration of `generate`.

Under `trainer.strategy=fsdp` (FSDP2, kpo_lightning/models/sharding.py) each process holds a shard of every weight;
`generate` runs many forwards, and a different number on each process (sequences stop at different lengths), so
gathering per forward would hang. The weights are gathered once on entry (bfloat16 under bf16-mixed) and kept
until exit. Under plain or DDP training this is a no-op. Every process must enter (it is a collective).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from kpo_lightning.models.sharding import is_sharded, unsharded


def full_weights_for_generation(trainer, policy) -> AbstractContextManager:
    if is_sharded(policy):
        return unsharded(policy)
    return nullcontext()
