"""Counts are summed over processes, never averaged: every `sum` name of a step's logs, two processes, by value.

Two "processes" are two threads sharing a summing/maxing `reduce` (as in test_step_logs.py, whose data leaves
`reward_timeouts` out). The expected totals are written out: 2 + 5 reward timeouts are 7 (a mean would be 3.5).
"""

from __future__ import annotations

import threading

import torch

from kpo_lightning.algorithms.step_logs import ROLLOUT_RULES, StepLogs

# This process's own counts (rank 0, rank 1): different on purpose, so a mean differs from the sum.
COUNTS = {"reward_errors": (1.0, 4.0), "reward_timeouts": (2.0, 5.0), "generated_tokens": (30.0, 50.0)}


def two_threads(fn):
    """fn(rank, reduce) on two threads whose `reduce(tensor, op)` returns the sum (or maximum) of both tensors."""
    barrier, slots, out = threading.Barrier(2, timeout=30), {}, [None, None]

    def reduce_for(rank):
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            slots[(rank, op)] = t.clone()
            barrier.wait()
            a, b = slots[(0, op)], slots[(1, op)]
            barrier.wait()
            return a + b if op == "sum" else torch.maximum(a, b)

        return reduce

    def target(rank):
        out[rank] = fn(rank, reduce_for(rank))

    threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def one_process_logs(rank: int, reduce):
    mask = torch.ones(4, 3, dtype=torch.bool)
    stats = {name: values[rank] for name, values in COUNTS.items()}
    stats.update(reward=0.5, reward_std=0.1, time_generate_s=1.0, time_score_s=1.0)
    return StepLogs().finish(
        stats,
        4,
        torch.zeros(4, 3),
        mask,
        step_seconds=1.0,
        update_seconds=1.0,
        same={},
        reduce=reduce,
    )


def test_every_rollout_count_is_the_sum_over_processes():
    rank0, rank1 = two_threads(one_process_logs)
    assert rank0 == rank1
    assert rank0["train/reward_errors"] == 5.0
    assert rank0["train/reward_timeouts"] == 7.0
    assert rank0["train/generated_tokens"] == 80.0
    # The test covers every rollout stat the rules call a count.
    assert {name for name, rule in ROLLOUT_RULES.items() if rule == "sum"} == set(COUNTS)
