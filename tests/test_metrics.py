"""Ratio diagnostics: accumulated over updates, merged and synced across processes, against direct loops."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kpo_lightning.algorithms.losses import compute_policy_loss
from kpo_lightning.algorithms.metrics import RatioMean, RatioVariance, SwitchFrequency


def shard(seed, B=5, T=11, scale=0.3):
    """A random (log_ratio, mask) batch with an empty row, a length-1 row and holes."""
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(B, T, generator=g) * scale
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False
    mask[1] = False
    mask[1, 3] = True
    log_ratio[~mask] = float("nan")  # padding garbage must be ignored
    return log_ratio, mask


def direct_variance(shards):
    values = [math.exp(float(z)) for lr, m in shards for z in lr[m]]
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def direct_switch(shards):
    fracs = []
    for lr, m in shards:
        for i in range(m.shape[0]):
            states = [float(z) > 0 for z in lr[i][m[i]]]
            if len(states) >= 2:
                fracs.append(sum(a != b for a, b in zip(states, states[1:])) / (len(states) - 1))
    return sum(fracs) / len(fracs)


SHARDS = [shard(s) for s in range(4)]


def test_ratio_variance_accumulates():
    m = RatioVariance()
    for lr, mask in SHARDS:
        m.update(lr, mask)
    assert m.compute().item() == pytest.approx(direct_variance(SHARDS), rel=1e-5)
    assert m.compute().dim() == 0


def test_ratio_variance_keeps_digits_near_one():
    """KPO-clipped's filtered ratios sit within ~1e-7 of 1; the variance must still be right."""
    shards = [(lr * 1e-7, m) for lr, m in SHARDS]
    m = RatioVariance("filtered")
    for lr, mask in shards:
        m.update(lr, mask)
    values = [float(torch.expm1(z.double())) for lr, mk in shards for z in lr[mk]]
    mean = sum(values) / len(values)
    expected = sum((v - mean) ** 2 for v in values) / len(values)
    assert m.compute().item() == pytest.approx(expected, rel=1e-4)


def test_ratio_variance_matches_the_loss_metric():
    lr, mask = SHARDS[1]
    logp = torch.randn(lr.shape)
    _, metrics = compute_policy_loss("grpo", logp, logp - lr.nan_to_num(), torch.randn(lr.shape[0]), mask)
    m = RatioVariance()
    m.update(lr, mask)
    assert m.compute().item() == pytest.approx(metrics["ratio_var_raw"].item(), rel=1e-4)


def test_switch_frequency_accumulates_and_skips_holes():
    m = SwitchFrequency()
    for lr, mask in SHARDS:
        m.update(lr, mask)
    assert m.compute().item() == pytest.approx(direct_switch(SHARDS), rel=1e-6)
    # holes are skipped: + (hole) - + -> pairs (+,-), (-,+): 2 switches of 2
    m = SwitchFrequency()
    m.update(torch.tensor([[1.0, 9.0, -1.0, 1.0], [1.0, 2.0, 0.0, 0.0]]), torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]))
    assert m.compute().item() == pytest.approx((1.0 + 0.0) / 2)


def direct_mean(shards):
    values = [math.exp(float(z)) for lr, m in shards for z in lr[m]]
    return sum(values) / len(values)


def test_ratio_mean_accumulates_and_matches_the_loss_metric():
    m = RatioMean()
    for lr, mask in SHARDS:
        m.update(lr, mask)
    assert m.compute().item() == pytest.approx(direct_mean(SHARDS), rel=1e-6)
    lr, mask = SHARDS[1]
    logp = torch.randn(lr.shape)
    _, metrics = compute_policy_loss("grpo", logp, logp - lr.nan_to_num(), torch.randn(lr.shape[0]), mask)
    one = RatioMean()
    one.update(lr, mask)
    assert one.compute().item() == pytest.approx(metrics["ratio_mean_raw"].item(), rel=1e-6)


def test_merge_state_equals_one_metric():
    for cls, direct in ((RatioVariance, direct_variance), (RatioMean, direct_mean), (SwitchFrequency, direct_switch)):
        a, b = cls(), cls()
        for lr, mask in SHARDS[:1]:
            a.update(lr, mask)
        for lr, mask in SHARDS[1:]:
            b.update(lr, mask)
        a.merge_state(b)
        assert a.compute().item() == pytest.approx(direct(SHARDS), rel=1e-5)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        var, mean, switch = RatioVariance(), RatioMean(), SwitchFrequency()
        mine = SHARDS[:1] if rank == 0 else SHARDS[1:]  # uneven on purpose
        for lr, mask in mine:
            var.update(lr, mask)
            mean.update(lr, mask)
            switch.update(lr, mask)
        results = [var.compute(), mean.compute(), switch.compute()]  # compute() syncs across processes
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        var, mean, switch = torch.load(tmp_path / f"rank{rank}.pt")
        assert var.item() == pytest.approx(direct_variance(SHARDS), rel=1e-5)
        assert mean.item() == pytest.approx(direct_mean(SHARDS), rel=1e-6)
        assert switch.item() == pytest.approx(direct_switch(SHARDS), rel=1e-6)
