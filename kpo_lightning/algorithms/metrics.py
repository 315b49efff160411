"""Ratio diagnostics of spec section 6 as torchmetrics `Metric`s: accumulate over steps, sync across processes.

Every state is a float64 sum reduced with dist_reduce_fx="sum", so a metric accumulated over several updates, or
over several processes, equals the direct computation over the concatenation of all its inputs.
Feed the raw log-ratio (logp - old_logp) for the raw series, and the filter's rho for the filtered one.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from kpo_lightning.algorithms.losses import LOG_RATIO_CLAMP as _LOG_RATIO_CLAMP  # the losses' clamp


class Float64StateMetric(Metric):
    """A `Metric` whose float64 states stay float64 whatever the module is converted to.

    torchmetrics applies `.to(dtype=...)` to metric states, and Lightning's bf16-true converts the whole
    LightningModule with `.to(dtype=torch.bfloat16)`: sums of ~1e-8 deviations (and counts past 256) would round
    away in bfloat16. Device moves still apply.
    """

    def _apply(self, fn, exclude_state=()):
        keep = [k for k, v in self._defaults.items() if isinstance(v, Tensor) and v.dtype == torch.float64]
        this = super()._apply(fn, exclude_state=(*exclude_state, *keep))
        for key in keep:  # only the device follows
            this._defaults[key] = this._defaults[key].to(this.device)
            setattr(this, key, getattr(this, key).to(this.device))
        return this


class RatioVariance(Float64StateMetric):
    """Population variance of the ratio exp(log_ratio) over all valid tokens seen.

    `ratio` names the series fed to it ("raw" or "filtered"), for logging; it does not change the computation.
    Accumulates sums of d = expm1(log_ratio) = ratio - 1 (var(ratio) = var(d)), so ratios within 1e-8 of 1, as
    after KPO-clipped's filter, keep their digits.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, ratio: str = "raw", **kwargs) -> None:
        super().__init__(**kwargs)
        if ratio not in ("raw", "filtered"):
            raise ValueError(f"ratio must be 'raw' or 'filtered', got {ratio!r}")
        self.ratio = ratio
        for name in ("sum", "sum_sq", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_ratio: Tensor, mask: Tensor) -> None:
        mask = mask.bool()
        d = torch.expm1(log_ratio.detach().double().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        d = torch.where(mask, d, 0.0)
        self.sum += d.sum()
        self.sum_sq += d.square().sum()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        n = self.count.clamp_min(1)
        mean = self.sum / n
        return (self.sum_sq / n - mean.square()).clamp_min(0).float()


class RatioMean(RatioVariance):
    """Mean of the ratio exp(log_ratio) over all valid tokens seen: the same sums as `RatioVariance`, another
    `compute` (1 + mean of expm1(log_ratio))."""

    def compute(self) -> Tensor:
        return (1.0 + self.sum / self.count.clamp_min(1)).float()


class SwitchFrequency(Float64StateMetric):
    """Mean over responses (with >= 2 valid tokens) of the share of adjacent valid-token pairs whose sign flips.

    The state of a token is `log_ratio > 0`; pairs are adjacent in the valid order (masked holes are skipped).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("frac_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_ratio: Tensor, mask: Tensor) -> None:
        frac, has_pairs = switch_fractions(log_ratio, mask)
        self.frac_sum += frac.double().sum()
        self.count += has_pairs.sum()

    def compute(self) -> Tensor:
        return (self.frac_sum / self.count.clamp_min(1)).float()


def switch_fractions(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row share of sign switches between consecutive valid tokens (B,), and which rows have >= 2 of them."""
    mask = mask.bool()
    state = log_ratio.detach() > 0
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    last_valid = torch.where(mask, pos, -1).cummax(-1).values  # index of the latest valid token at or before t
    prev = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], -1)  # ... strictly before t
    is_pair = mask & (prev >= 0)
    flips = is_pair & (state != state.gather(-1, prev.clamp_min(0)))
    pairs = is_pair.sum(-1)
    frac = torch.where(pairs > 0, flips.sum(-1) / pairs.clamp_min(1), 0.0)
    return frac, pairs > 0
