"""Generation under sharded strategies: gather the full weights for the duration of `generate`.

FSDP and DeepSpeed ZeRO-3 keep each process's shard only; transformers' `generate` needs whole weights. Under
plain or DDP training this is a no-op. (Written for GPUs; the CPU test suite runs the no-op path only.)
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager


def full_weights_for_generation(trainer, policy) -> ContextManager:
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__ if strategy is not None else ""
    if name == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(strategy.model, writeback=False, recurse=True)
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None)
    return nullcontext()
