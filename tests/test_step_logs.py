"""The train/* values of a rollout step combined over processes equal the direct computation over all processes'
data (two "processes" are two threads sharing a summing/maxing `reduce`; tests/test_ddp.py runs real ones)."""

import threading

import pytest
import torch

from kpo_lightning.algorithms.kalman import kalman_filter_reference
from kpo_lightning.algorithms.losses import compute_policy_loss
from kpo_lightning.algorithms.step_logs import StepLogs, Value, combine

KALMAN = {"kalman_q": 4e-3, "kalman_v": 2.0, "kalman_p0": 0.1}  # a KPO loss's filter: Q/V = 2e-3


class TwoProcesses:
    """`reduce(tensor, op)` for two threads: waits for both tensors and gives each the sum (or maximum)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.slots: dict[tuple[int, str], torch.Tensor] = {}

    def reduce_for(self, rank: int):
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[(rank, op)] = t.clone()
            self.barrier.wait()
            a, b = self.slots[(0, op)], self.slots[(1, op)]
            self.barrier.wait()
            return a + b if op == "sum" else torch.maximum(a, b)

        return reduce


def run_both(fn):
    """fn(rank, reduce) in two threads; returns both results."""
    group, out = TwoProcesses(), [None, None]

    def target(rank):
        out[rank] = fn(rank, group.reduce_for(rank))

    threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def process_data(rank: int):
    """Different data per process, and unequal sizes (6 and 10 samples) so weights matter."""
    g = torch.Generator().manual_seed(rank)
    n, T = (6, 10)[rank], 7
    rewards = (torch.rand(n, generator=g) > 0.5).float() * (rank + 1) / 2
    mask = torch.rand(n, T, generator=g) > 0.3
    mask[:, 0] = True
    entropy = torch.rand(n, T, generator=g)
    logp = torch.randn(n, T, generator=g) * 0.1 - 2
    old = logp + torch.randn(n, T, generator=g) * 0.3  # ratios far from 1: clip fractions are not 0
    adv = torch.randn(n, generator=g)
    return rewards, mask, entropy, logp, old, adv


def step_logs(rank: int, reduce):
    rewards, mask, entropy, logp, old, adv = process_data(rank)
    logs = StepLogs()
    for rows in (slice(0, 3), slice(3, None)):  # two micro-batches
        loss, metrics = compute_policy_loss(
            "grpo", logp[rows], old[rows], adv[rows], mask[rows], clip_low=0.2, clip_high=0.28, dual_clip=0.0
        )
        logs.add_micro_batch(metrics)
    logs.add_optimizer_step(torch.tensor(0.5 + rank), grad_norm=3.0)
    stats = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "reward_errors": float(rank + 1),
        "generated_tokens": float(mask.sum()),
        "time_generate_s": 1.0 + rank,
        "time_score_s": 0.5,
    }
    return logs.finish(
        stats,
        len(rewards),
        entropy,
        mask,
        step_seconds=2.0 + 3 * rank,
        update_seconds=1.0 - rank / 2,
        same={"lr": 0.1},
        kalman=KALMAN,
        reduce=reduce,
    )


def test_step_logs_over_two_processes_are_the_whole_runs_values():
    rank0, rank1 = run_both(step_logs)
    assert rank0 == rank1  # every process logs the same numbers
    data = [process_data(r) for r in (0, 1)]
    rewards = torch.cat([d[0] for d in data]).double()
    mask = torch.cat([d[1] for d in data])
    entropy = torch.cat([d[2] for d in data]).double()
    logp = torch.cat([d[3] for d in data]).double()
    old = torch.cat([d[4] for d in data]).double()
    adv = torch.cat([d[5] for d in data]).double()
    ratio = (logp - old).exp()
    clipped_low = ((adv[:, None] < 0) & (ratio < 0.8) & mask).sum().item()  # clip_low=0.2
    clipped_high = ((adv[:, None] > 0) & (ratio > 1.28) & mask).sum().item()  # clip_high=0.28
    assert clipped_low > 0 and clipped_high > 0
    n_tokens = mask.sum().item()
    filtered_ones = kalman_filter_reference(torch.ones(mask.shape, dtype=torch.float64), mask, 4e-3, 2.0, 0.1)
    # float32 inputs summed in float64: measured relative error <= 3e-8; 1e-6 leaves a wide margin
    expected = {
        "train/reward": rewards.mean().item(),
        "train/reward_std": rewards.std().item(),
        "train/reward_errors": 1.0 + 2.0,
        "train/generated_tokens": n_tokens,
        "train/time_generate_s": 2.0,
        "train/time_score_s": 0.5,
        "train/time_update_s": 1.0,
        "train/tokens_per_second": n_tokens / 5.0,  # the slowest process's step: 2 + 3 s
        "train/entropy": (entropy * mask).sum().item() / n_tokens,
        "train/num_tokens": n_tokens,
        "train/nonfinite_tokens": 0.0,
        "train/clip_frac_low": clipped_low / n_tokens,
        "train/clip_frac_high": clipped_high / n_tokens,
        "train/clip_frac_dual": 0.0,
        "train/clip_frac": (clipped_low + clipped_high) / n_tokens,
        "train/loss": (0.5 + 1.5) / 2,
        "train/grad_norm": 3.0,
        "train/lr": 0.1,
        # tau at the mean valid length of all samples; the constant-drift share averaged over all valid tokens
        "train/kalman_tau": mask.sum(1).double().mean().item() * (2e-3) ** 0.5,
        "train/filter_weight": filtered_ones[mask].mean().item(),
    }
    assert rank0.keys() == expected.keys()
    for name, value in expected.items():
        assert rank0[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    own, _ = run_both(lambda rank, reduce: step_logs(rank, None))  # each process's own values, not combined
    for name in ("train/reward", "train/reward_std", "train/entropy", "train/clip_frac_low", "train/loss") + (
        "train/kalman_tau",
        "train/filter_weight",
    ):
        assert own[name] != pytest.approx(rank0[name], rel=1e-3), name


def test_one_process_keeps_its_own_values_exactly():
    values = {
        "a": Value(0.1, "mean", 3),
        "b": Value(torch.tensor(2.0), "sum"),
        "c": Value(0.0, "std", 5, mean=0.1),
        "d": Value(7.0, "max"),
        "e": Value(1.5, "same"),
    }
    assert combine(values, None) == {"a": 0.1, "b": 2.0, "c": 0.0, "d": 7.0, "e": 1.5}


def test_pooled_std_of_equal_rewards_is_zero_and_unknown_rules_are_refused():
    def both(rank, reduce):
        return combine({"reward_std": Value(0.0, "std", 3 + rank, mean=0.25)}, reduce)

    assert run_both(both)[0]["reward_std"] == pytest.approx(0.0, abs=1e-7)  # cancellation error only
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        combine({"x": Value(1.0, "median")}, lambda t, op: t)
