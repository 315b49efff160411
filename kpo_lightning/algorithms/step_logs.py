"""The `train/*` values of one rollout step: one definition per logged name, combined over processes.

`KPOModule.training_step` feeds a `StepLogs` what happened on this process (the loss metrics of every
micro-batch, the loss and gradient norm of every optimizer step); `finish` returns the logged dict. Each value is
first this process's own, then combined over processes by its rule (docs/logging.md has the table):

    mean   weighted mean sum_p weight_p * value_p / sum_p weight_p (weights: tokens, samples, or 1 per process)
    sum    a count: sum_p value_p
    std    the standard deviation of all processes' samples, pooled from each one's (count, mean, std)
    max    a time: the slowest process's
    same   already equal on every process (gradient norm, learning rate, skip counters): not reduced

On one process (`reduce=None`) every value is the process's own, unchanged. Otherwise one float64 all-reduce of
sums and one of maxima combine them; the ratio diagnostics are torchmetrics that sync their own states. No Lightning
import: `reduce(tensor, op)` is passed in (the strategy's `reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from kpo_lightning.algorithms.kalman import mean_filter_weight, tau_at

Reduce = Callable[[Tensor, str], Tensor]  # (tensor, "sum" | "max") -> the tensor reduced over processes
Number = float | Tensor

# rollout.stats key -> rule; "mean" is weighted by the process's samples. Any other key: a mean over samples.
ROLLOUT_RULES = {
    "reward": "mean",
    "reward_std": "std",
    "reward_errors": "sum",
    "reward_timeouts": "sum",
    "zero_var_group_frac": "mean",  # groups: every process holds whole groups of one size, so samples weigh alike
    "response_length": "mean",
    "truncated_frac": "mean",
    "empty_frac": "mean",
    "generated_tokens": "sum",
    "time_generate_s": "max",
    "time_score_s": "max",
}
# compute_policy_loss metric -> rule; "mean" is weighted by the micro-batch's valid finite tokens. The loss's
# ratio_mean_*/ratio_var_* (per micro-batch, on-policy mini-batch included) are not logged: the ratio diagnostics
# are the torchmetrics over off-policy tokens (KPOModule._update_ratio_metrics).
LOSS_RULES = {
    "clip_frac_low": "mean",
    "clip_frac_high": "mean",
    "clip_frac_dual": "mean",
    "kl": "mean",
    "nonfinite_tokens": "sum",
    "num_tokens": "sum",
}


@dataclass
class Value:
    """This process's value of one logged name, with how to combine it over processes."""

    value: Number
    rule: str  # mean | sum | std | max | same
    weight: Number = 1.0  # mean: this process's weight; std: its sample count
    mean: Number = 0.0  # std: the mean of this process's samples


def combine(values: dict[str, Value], reduce: Reduce | None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Each value over all processes by its rule; with `reduce=None` (one process) each own value as it is."""
    if reduce is None:
        return {name: float(v.value) for name, v in values.items()}
    names = sorted(values)  # every process packs the same names in the same order

    def f64(x: Number) -> Tensor:
        return torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())

    sums: list[Tensor] = []
    maxes: list[Tensor] = []
    for name in names:
        v = values[name]
        if v.rule == "mean":
            sums += [f64(v.value) * f64(v.weight), f64(v.weight)]
        elif v.rule == "sum":
            sums.append(f64(v.value))
        elif v.rule == "std":  # count, sum, sum of squares ((n - 1) s^2 + n m^2 for the unbiased std s)
            n, m, s = f64(v.weight), f64(v.mean), f64(v.value)
            sums += [n, n * m, (n - 1) * s.square() + n * m.square()]
        elif v.rule == "max":
            maxes.append(f64(v.value))
        elif v.rule != "same":
            raise ValueError(f"unknown rule {v.rule!r} for {name!r}")
    total = iter(reduce(torch.stack(sums), "sum").tolist() if sums else [])
    top = iter(reduce(torch.stack(maxes), "max").tolist() if maxes else [])
    out: dict[str, float] = {}
    for name in names:
        v = values[name]
        if v.rule == "mean":
            num, den = next(total), next(total)
            out[name] = num / den if den > 0 else 0.0
        elif v.rule == "sum":
            out[name] = next(total)
        elif v.rule == "std":
            n, s, sq = next(total), next(total), next(total)
            out[name] = math.sqrt(max(sq - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0
        elif v.rule == "max":
            out[name] = next(top)
        else:
            out[name] = float(v.value)
    return out


class StepLogs:
    """Collects one rollout step on this process; `finish` gives the logged `train/*` dict.

    Sums stay on the device until `finish` (one sync per step, not one per micro-batch).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}  # LOSS_RULES names: token-weighted sums ("mean") or counts ("sum")
        self._tokens: Tensor | None = None
        self._losses: list[float] = []
        self._grad_norms: list[float] = []

    def add_micro_batch(self, metrics: dict[str, Tensor]) -> None:
        """The metrics `compute_policy_loss` returned for one micro-batch."""
        tokens = metrics["num_tokens"]
        for name, rule in LOSS_RULES.items():
            if name in metrics:
                add = metrics[name] if rule == "sum" else metrics[name] * tokens
                self._sums[name] = self._sums[name] + add if name in self._sums else add
        self._tokens = tokens if self._tokens is None else self._tokens + tokens

    def add_optimizer_step(self, loss: Number, grad_norm: float) -> None:
        """One optimizer step: this process's mini-batch loss (the sum of its micro-batch losses) and the global
        gradient norm before clipping (NaN when the step was skipped for it)."""
        self._losses.append(float(loss))
        self._grad_norms.append(grad_norm)

    def finish(
        self,
        rollout_stats: dict[str, float],
        num_samples: int,
        entropy: Tensor,
        mask: Tensor,
        *,
        step_seconds: float,
        update_seconds: float,
        same: dict[str, float],
        ratio_diagnostics: Iterable = (),
        kalman: dict[str, float] | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, float]:
        """The step's logged values (names without the `train/` prefix are given it).

        rollout_stats: this process's `Rollout.stats` over its `num_samples` samples; entropy, mask: (rows, T) of
        every row of this process's rollout; step_seconds, update_seconds: this process's whole step and update;
        same: values already equal on every process (lr, skip counters); ratio_diagnostics: torchmetrics
        `MetricCollection`s, computed (synced) when they were updated this step, then reset; kalman: a KPO loss's
        filter (kalman_q, kalman_v, kalman_p0), for kalman_tau and filter_weight over the rollout's mask.
        """
        values = {k: Value(v, ROLLOUT_RULES.get(k, "mean"), num_samples) for k, v in rollout_stats.items()}
        if "reward_std" in values:
            values["reward_std"].mean = rollout_stats.get("reward", 0.0)
        for name, total in self._sums.items():
            rule = LOSS_RULES[name]
            tokens = self._tokens
            values[name] = Value(total, rule) if rule == "sum" else Value(total / tokens.clamp(min=1.0), rule, tokens)
        valid = mask.sum()
        values["entropy"] = Value((entropy * mask).sum() / valid.clamp(min=1), "mean", valid)
        if kalman is not None:
            q, v, p0 = kalman["kalman_q"], kalman["kalman_v"], kalman["kalman_p0"]
            rows = mask.shape[0]
            # tau at the mean valid length (linear in it: the sample-weighted mean over processes is the global one)
            values["kalman_tau"] = Value(tau_at(valid / max(rows, 1), q, v), "mean", rows)
            values["filter_weight"] = Value(mean_filter_weight(mask, q, v, p0), "mean", valid)
        # Each process's loss is normalised by (global count / processes), so their mean is the global-batch loss.
        values["loss"] = Value(sum(self._losses) / max(len(self._losses), 1), "mean")
        values["grad_norm"] = Value(sum(self._grad_norms) / max(len(self._grad_norms), 1), "same")
        values["time_update_s"] = Value(update_seconds, "max")
        values["step_seconds"] = Value(step_seconds, "max")
        values.update({k: Value(v, "same") for k, v in same.items()})

        logs = combine(values, reduce, mask.device)
        step_seconds = logs.pop("step_seconds")
        if "generated_tokens" in logs:
            logs["tokens_per_second"] = logs["generated_tokens"] / max(step_seconds, 1e-9)
        if "clip_frac_low" in logs and "clip_frac_high" in logs:
            logs["clip_frac"] = logs["clip_frac_low"] + logs["clip_frac_high"]
        for collection in ratio_diagnostics:
            if any(metric.update_count > 0 for metric in collection.values()):
                logs.update({k: float(v) for k, v in collection.compute().items()})
            collection.reset()
        return {f"train/{k}": v for k, v in logs.items()}
