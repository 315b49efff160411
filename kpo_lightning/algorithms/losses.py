"""Policy-gradient losses of the GRPO family: GRPO, GSPO, GMPO, KPO and KPO-clipped (spec sections 3-4).

One entry point with one signature for every loss, backed by a registry (like verl's policy-loss registry):

    loss, metrics = compute_policy_loss("kpo_clipped", logp, old_logp, advantages, mask)

Each registered loss turns the batch into a per-token loss matrix (B, T); the shared code around it handles
non-finite inputs, the optional KL term, the aggregation over tokens and sequences, and the metrics.

Options (the same names for every loss; `None` for any of them means "the default", see `LOSS_DEFAULTS`):
    clip_low, clip_high   clip range [1 - clip_low, 1 + clip_high] of the ratio (GMPO: [-clip_low, clip_high]
                          of the log-ratio)
    dual_clip             cap -A * dual_clip on the loss of tokens with A < 0 (verl); 0 disables. > 1 otherwise
    kalman_q, kalman_v, kalman_p0   filter noise variances and initial variance (KPO losses)
    agg                   token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    agg_norm_constant     the constant seq-mean-token-sum-norm divides token sums by (default: mask.shape[-1])
    ref_logp, beta, kl_estimator    KL(pi || ref) term: beta * KL per token, aggregated like the loss
    normalizer            the count the aggregation divides by, for the FULL batch (see below)

Normalizer. The loss is `sum over the call's sequences/tokens / normalizer`, where the normalizer is the number
of sequences with at least one valid token (seq-mean-*) or the number of valid tokens (token-mean) of the whole
batch; `aggregation_normalizer(agg, mask)` gives that count for a mask. Called on micro-batches with the full
batch's normalizer, the summed losses and gradients equal those of one call on the whole batch. Under DDP, which
averages gradients over processes, pass the global count divided by the world size. Default: this call's count.
Rows without valid tokens contribute 0 and are not counted as sequences.

Non-finite inputs. A valid token whose logp, old_logp (or ref_logp, when given) is not finite is dropped: it
contributes 0 to the loss and gets no gradient, and is counted in `metrics["nonfinite_tokens"]`. The normalizer
still counts it (the caller's counts are computed from the mask before any log-prob is known), while
seq-mean-token-mean averages each row over its remaining finite tokens.

Log-ratio clamps (as verl). Token log-ratios log r_t = logp - old_logp are clamped to [-20, 20] before exp in
GRPO and GMPO (and in the ratio metrics and the k3 KL); the rebuilt log-ratios, KPO's filtered rho_t and GSPO's
sequence mean, are clamped above at 10 only (no lower bound: their ratios just go to 0). Each is a torch.clamp:
beyond a bound the value is the bound's and the gradient through that token is exactly 0 (the token stops
contributing to the update), not a straight-through gradient. tests/test_losses.py pins both bounds and the zero
gradient with data on either side of each.

Metrics (0-d detached float tensors, computed on this call's valid finite tokens, independent of `normalizer`):
    clip_frac_low, clip_frac_high, clip_frac_dual   share of tokens whose clipped (or dual-clip) term was the
                                   active one: low = A < 0 and ratio below the range, high = A > 0 and ratio above
                                   it (GMPO: the log-ratio); 0 for losses without that clip
    ratio_mean_raw, ratio_var_raw  mean and population variance of the token ratio exp(logp - old_logp)
                                   (log-ratio clamped to [-20, 20])
    ratio_mean_filtered, ratio_var_filtered   the same for the Kalman-filtered ratio; only for kpo losses
    kl                             the KL estimate aggregated like the loss with this call's own count; only
                                   when ref_logp is given
    nonfinite_tokens, num_tokens   dropped tokens; valid finite tokens (weights for averaging the fractions)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpo_lightning.algorithms.kalman import causal_kalman_filter, qv_from_tau, tau_at
from kpo_lightning.config import LossConfig
from kpo_lightning.errors import UserInputError, check_choice

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # token log-ratios are clamped to +-this before exp (verl); zero gradient beyond
MAX_LOG_RATIO = 10.0  # upper clamp on rebuilt log-ratios (KPO, GSPO), as verl's GSPO; zero gradient beyond

# Options every loss takes, with their defaults: the config's (the paper: seq-mean-token-mean, no KL term).
_SHARED_DEFAULTS: dict[str, Any] = {name: getattr(LossConfig(), name) for name in ("agg", "beta", "kl_estimator")}
# Options every loss takes that have no fixed default (they depend on the data).
_DATA_OPTIONS = ("agg_norm_constant", "ref_logp", "normalizer")


@dataclass(frozen=True)
class LossInputs:
    """What a registered loss sees: float32 (B, T) tensors, zeroed at invalid positions."""

    logp: Tensor  # current log-probs, with grad
    old_logp: Tensor  # behaviour log-probs, detached
    log_ratio: Tensor  # logp - old_logp, detached (the filter's observation z)
    adv: Tensor  # advantages per token, detached
    valid: Tensor  # bool: in the mask and finite
    opts: dict[str, Any]  # resolved options


# A loss returns the per-token loss (B, T) and extras: bool flags "clipped_low"/"clipped_high"/"clipped_dual"
# and/or "filtered_log_ratio" (B, T).
LossFn = Callable[[LossInputs], tuple[Tensor, dict[str, Tensor]]]

_LOSSES: dict[str, LossFn] = {}
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_loss(name: str, **defaults: Any) -> Callable[[LossFn], LossFn]:
    """Register a per-token loss under `name` with its paper defaults (its specific options)."""

    def deco(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        LOSS_DEFAULTS[name] = {**defaults, **_SHARED_DEFAULTS}
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- losses


def _ppo_clip(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, dual_clip: float):
    """max(-A r, -A clip(r)), then for A < 0 the dual-clip cap min(., -A * dual_clip) (verl's vanilla loss)."""
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss1, loss2)
    r = ratio.detach()
    flags = {"clipped_low": (adv < 0) & (r < 1.0 - clip_low), "clipped_high": (adv > 0) & (r > 1.0 + clip_high)}
    if dual_clip:
        loss3 = -adv * dual_clip
        flags["clipped_dual"] = (adv < 0) & (loss.detach() > loss3)
        loss = torch.where(adv < 0, torch.minimum(loss, loss3), loss)
    return loss, flags


@register_loss("grpo", clip_low=0.2, clip_high=0.2, dual_clip=3.0)
def grpo_loss(b: LossInputs):
    """GRPO/PPO: token ratio r_t, clipped per token, dual clip for A < 0."""
    ratio = (b.logp - b.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    o = b.opts
    return _ppo_clip(ratio, b.adv, o["clip_low"], o["clip_high"], o["dual_clip"])


@register_loss("gspo", clip_low=3e-4, clip_high=4e-4)
def gspo_loss(b: LossInputs):
    """GSPO: one sequence ratio s = exp(mean_t log r_t), token form s_t = sg(s) * pi_t / sg(pi_t), clipped."""
    n = b.valid.sum(-1, keepdim=True).clamp_min(1)
    seq_log_ratio = b.log_ratio.sum(-1, keepdim=True) / n  # log_ratio is 0 at invalid positions
    ratio = (b.logp - b.logp.detach() + seq_log_ratio).clamp(max=MAX_LOG_RATIO).exp()
    return _ppo_clip(ratio, b.adv, b.opts["clip_low"], b.opts["clip_high"], 0.0)


@register_loss("gmpo", clip_low=0.4, clip_high=0.4)
def gmpo_loss(b: LossInputs):
    """GMPO: log-ratios clipped on the side that matters for sign(A); objective A * exp(mean_t l_t).

    Written in token form, l_t(grad) = sg(g) * exp(l_t - sg(l_t)) with g = exp(mean_t l_t): under
    seq-mean-token-mean its value and gradient are exactly those of the sequence objective -A * g.
    """
    z = (b.logp - b.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lo, hi = b.opts["clip_low"], b.opts["clip_high"]
    sgn = b.adv.sign()
    l = sgn * torch.minimum(sgn * z, sgn * z.clamp(-lo, hi))
    l = torch.where(b.valid, l, 0.0)
    n = b.valid.sum(-1, keepdim=True).clamp_min(1)
    g = (l.detach().sum(-1, keepdim=True) / n).exp()
    loss = -b.adv * g * (l - l.detach()).exp()
    zd = z.detach()
    return loss, {"clipped_low": (b.adv < 0) & (zd < -lo), "clipped_high": (b.adv > 0) & (zd > hi)}


def _filtered_ratio(b: LossInputs) -> tuple[Tensor, Tensor]:
    """r_tilde = exp(logp - sg(logp) + sg(rho)) clamped above: value exp(rho_t), gradient r_hat_t * grad logp_t."""
    o = b.opts
    rho = causal_kalman_filter(b.log_ratio, b.valid, o["kalman_q"], o["kalman_v"], o["kalman_p0"])
    rho = rho.detach().to(b.logp.dtype)
    return (b.logp - b.logp.detach() + rho).clamp(max=MAX_LOG_RATIO).exp(), rho


@register_loss("kpo", kalman_q=1e-4, kalman_v=1.0, kalman_p0=0.0)
def kpo_loss(b: LossInputs):
    """KPO (unclipped): -A * r_tilde_t, the Kalman-filtered token ratio."""
    ratio, rho = _filtered_ratio(b)
    return -b.adv * ratio, {"filtered_log_ratio": rho}


@register_loss("kpo_clipped", kalman_q=1e-6, kalman_v=1.0, kalman_p0=0.0, clip_low=3e-4, clip_high=4e-4, dual_clip=0.0)
def kpo_clipped_loss(b: LossInputs):
    """KPO-clipped: PPO clip applied to the filtered ratio (no dual clip in the paper)."""
    ratio, rho = _filtered_ratio(b)
    o = b.opts
    loss, flags = _ppo_clip(ratio, b.adv, o["clip_low"], o["clip_high"], o["dual_clip"])
    return loss, {**flags, "filtered_log_ratio": rho}


LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)
KPO_LOSSES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if "kalman_q" in LOSS_DEFAULTS[t])  # kpo, kpo_clipped
# The tau a KPO loss gets in KPOModule and run.py when neither loss.kalman_q nor loss.kalman_tau is set: the paper's
# own regime (Q/V 1e-6 at 4096 tokens is tau 4.1), and on the chain task under off-policy stress as stable as GRPO
# over 10 seeds, where the paper's Q/V at those lengths is not (docs/kalman-tau.md). compute_policy_loss alone keeps
# LOSS_DEFAULTS' kalman_q.
DEFAULT_KALMAN_TAU = 4.0
# Every loss-specific option name (each is a `LossConfig` field), from the registry: clip_low, clip_high,
# dual_clip, kalman_q, kalman_v, kalman_p0.
LOSS_OPTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(name for defaults in LOSS_DEFAULTS.values() for name in defaults if name not in _SHARED_DEFAULTS)
)

# ----------------------------------------------------------------------------------------------- options


# The accepted range of every numeric loss option, stated once: `resolve_loss_options` and the config's loss.*
# checks (config_checks) both use `check_loss_option`. A clip bound is an epsilon of the spec's clip(r, 1 - eps_low,
# 1 + eps_high) (GMPO: of the log-ratio): the ratio's lower bound 1 - eps_low must stay above 0.
OPTION_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "clip_low": (lambda x: 0.0 < x < 1.0, "a clip bound must lie in (0, 1), e.g. 0.2"),
    "clip_high": (lambda x: 0.0 < x < 1.0, "a clip bound must lie in (0, 1), e.g. 0.2"),
    "dual_clip": (lambda x: x == 0.0 or x > 1.0, "it must be > 1 (verl uses 3.0), or 0 to disable it"),
    "kalman_q": (lambda x: x > 0.0, "it must be > 0"),
    "kalman_v": (lambda x: x > 0.0, "it must be > 0"),
    "kalman_p0": (lambda x: x >= 0.0, "it must be >= 0"),
    "beta": (lambda x: x >= 0.0, "it must be >= 0"),
    "agg_norm_constant": (lambda x: x > 0.0, "it must be > 0"),
    "normalizer": (lambda x: x >= 0.0, "it must be >= 0"),
}
# The length-aware way to set Q (config and KPOModule, not compute_policy_loss: the loss does not know L).
TAU_OPTION_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "kalman_tau": (lambda x: x > 0.0, "it must be > 0, e.g. 4"),
    "kalman_ref_length": (lambda x: x >= 1, "it must be >= 1 (a response length in tokens), or null"),
}


def check_loss_type(loss_type: str) -> None:
    """The one check of a loss name (the config's loss.type, `KPOModule`, `compute_policy_loss`)."""
    check_choice("loss.type", loss_type, LOSS_TYPES)


def check_loss_option(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number in `name`'s range (OPTION_RANGES), else one UserInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"loss.{name}={value!r} is invalid: it must be a finite number")
    in_range, fix = {**OPTION_RANGES, **TAU_OPTION_RANGES}[name]
    if not in_range(value):
        raise UserInputError(f"loss.{name}={value!r} is invalid: {fix}")
    return float(value)


def kalman_options(cfg: LossConfig, max_new_tokens: int) -> dict[str, float]:
    """The filter's kalman_q, kalman_v, kalman_p0 for a loss config whose responses are up to max_new_tokens long.

    Q is, in this order: loss.kalman_q; Q = V * (kalman_tau / L)^2 with L = loss.kalman_ref_length, default
    max_new_tokens; for a KPO loss with neither set, tau = DEFAULT_KALMAN_TAU at that L; otherwise (GRPO, GSPO,
    GMPO: the diagnostic filter only) KPO-clipped's paper Q. V and P0: the config's, else the loss's (else
    KPO-clipped's) paper values. One UserInputError for both kalman_q and kalman_tau set, or a bad value.
    """
    for name in ("kalman_tau", "kalman_ref_length"):
        if getattr(cfg, name) is not None:
            check_loss_option(name, getattr(cfg, name))
    if cfg.kalman_q is not None and cfg.kalman_tau is not None:
        raise UserInputError(
            f"loss.kalman_q={cfg.kalman_q!r} and loss.kalman_tau={cfg.kalman_tau!r} are both set: set one of them "
            "(kalman_tau sets Q/V = (kalman_tau / L)^2, L = loss.kalman_ref_length or rollout.max_new_tokens); "
            "clear the other with loss.kalman_q=null or loss.kalman_tau=null"
        )
    if cfg.kalman_q is not None and cfg.kalman_ref_length is not None:
        raise UserInputError(
            f"loss.kalman_ref_length={cfg.kalman_ref_length!r} only scales loss.kalman_tau, but loss.kalman_q="
            f"{cfg.kalman_q!r} is set: set loss.kalman_tau instead of kalman_q, or remove kalman_ref_length"
        )
    paper = {**LOSS_DEFAULTS["kpo_clipped"], **LOSS_DEFAULTS[cfg.type]}
    opts = {k: getattr(cfg, k) if getattr(cfg, k) is not None else paper[k] for k in ("kalman_v", "kalman_p0")}
    opts = {k: check_loss_option(k, x) for k, x in opts.items()}
    tau = cfg.kalman_tau if cfg.kalman_tau is not None or cfg.type not in KPO_LOSSES else DEFAULT_KALMAN_TAU
    if cfg.kalman_q is not None:
        q = cfg.kalman_q
    elif tau is not None:
        q = opts["kalman_v"] * qv_from_tau(tau, cfg.kalman_ref_length or max_new_tokens)
    else:
        q = paper["kalman_q"]
    return {"kalman_q": check_loss_option("kalman_q", q), **opts}


def short_filter_warning(loss_type: str, kalman: dict[str, float], max_new_tokens: int) -> str | None:
    """The start-up warning for a KPO loss whose filter reaches tau < 1 at max_new_tokens, else None."""
    tau = tau_at(max_new_tokens, kalman["kalman_q"], kalman["kalman_v"])
    if loss_type not in KPO_LOSSES or tau >= 1.0:
        return None
    return (
        f"[kpo] warning: {loss_type} runs at tau = max_new_tokens * sqrt(Q/V) = {tau:.3g} < 1 (Q/V = "
        f"{kalman['kalman_q'] / kalman['kalman_v']:.4g}, max_new_tokens {max_new_tokens}): the filtered ratio stays "
        f"~1, KPO acts as REINFORCE on stale samples; set loss.kalman_tau (e.g. {DEFAULT_KALMAN_TAU:g}) or raise "
        "loss.kalman_q"
    )


def resolve_loss_options(loss_type: str, **options: Any) -> dict[str, Any]:
    """Validate options for `loss_type` and fill in its defaults; `None` values mean "the default".

    Raises UserInputError for an unknown loss type, an unknown option, an option set (not None) that this loss
    does not use, or a bad value. Call it at setup to fail fast on a bad config.
    """
    check_loss_type(loss_type)
    defaults = LOSS_DEFAULTS[loss_type]
    valid_names = (*defaults, *_DATA_OPTIONS)
    for name, value in options.items():
        if name not in valid_names and name not in LOSS_OPTIONS:
            raise UserInputError(
                f"unknown loss option {name!r}; valid options for {loss_type!r}: {', '.join(valid_names)}"
            )
        if name not in valid_names and value is not None:
            raise UserInputError(
                f"loss option {name!r} does not apply to loss {loss_type!r}; it takes: {', '.join(valid_names)}"
            )
    opts = {**defaults, **{k: None for k in _DATA_OPTIONS}}
    opts.update({k: v for k, v in options.items() if v is not None and k in valid_names})

    for name in OPTION_RANGES:
        if opts.get(name) is not None and not (name == "normalizer" and isinstance(opts[name], Tensor)):
            opts[name] = check_loss_option(name, opts[name])
    check_choice("loss.agg", opts["agg"], AGG_MODES)
    check_choice("loss.kl_estimator", opts["kl_estimator"], KL_ESTIMATORS)
    if opts["beta"] > 0 and opts["ref_logp"] is None:
        raise UserInputError("loss option beta > 0 needs ref_logp (the reference model's log-probs)")
    return opts


# ----------------------------------------------------------------------------------------------- aggregation


def _count(agg: str, mask: Tensor) -> Tensor:
    """Sequences with >= 1 valid token (seq-mean-*) or valid tokens (token-mean), as a 0-d tensor (no sync)."""
    mask = mask.bool()
    return mask.sum() if agg == "token-mean" else mask.any(-1).sum()


def aggregation_normalizer(agg: str, mask: Tensor) -> float:
    """The count `agg` divides by for this mask; sum it over micro-batches/processes to get `normalizer`."""
    check_choice("loss.agg", agg, AGG_MODES)
    return float(_count(agg, mask))


def aggregate(
    x: Tensor, valid: Tensor, agg: str, normalizer: float | Tensor, norm_constant: float | None = None
) -> Tensor:
    """Sum x (B, T) over valid tokens the way `agg` says (per-row means for seq-mean-token-mean), / normalizer."""
    x = torch.where(valid, x, 0.0)
    if agg == "seq-mean-token-mean":
        total = (x.sum(-1) / valid.sum(-1).clamp_min(1)).sum()
    else:
        total = x.sum()
        if agg == "seq-mean-token-sum-norm":
            total = total / (norm_constant if norm_constant is not None else x.shape[-1])
    if isinstance(normalizer, Tensor):  # e.g. all-reduced; an empty batch has total 0 and count 0
        return total / normalizer.to(total).clamp_min(1e-30)
    return total / (normalizer if normalizer > 0 else 1.0)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (verl's k1, k2 = 'mse', k3 = 'low_var_kl')."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    log_r = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_r.exp() - log_r - 1.0).clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------------------------- entry point


def _mean_var(log_ratio: Tensor, valid: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance of exp(log_ratio) over valid tokens; via expm1 so ratios near 1 keep digits."""
    d = torch.where(valid, torch.expm1(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), 0.0)
    mean = d.sum() / n
    var = torch.where(valid, (d - mean).square(), 0.0).sum() / n
    return 1.0 + mean, var


def compute_policy_loss(
    loss_type: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **options: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss of `loss_type` for a (micro-)batch; returns (0-d loss, metrics). See the module docstring.

    logp (B, T) current log-probs with grad; old_logp (B, T) behaviour log-probs; advantages (B,) or (B, T);
    mask (B, T), true at response tokens the policy produced.
    """
    opts = resolve_loss_options(loss_type, **options)
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one (B, T) shape, got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be (B,) or (B, T) for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    mask = mask.bool()
    logp32 = logp.float()
    old = old_logp.detach().float()
    ref = opts["ref_logp"]
    finite = torch.isfinite(logp32.detach()) & torch.isfinite(old)
    if ref is not None:
        ref = ref.detach().float()
        finite = finite & torch.isfinite(ref)
    valid = mask & finite
    # torch.where (not multiplication) so a NaN at a dropped position reaches neither the value nor the gradient.
    logp32 = torch.where(valid, logp32, 0.0)
    old = torch.where(valid, old, 0.0)
    adv = advantages.detach().float()
    adv = torch.where(valid, adv[:, None] if adv.dim() == 1 else adv, 0.0)
    inputs = LossInputs(logp32, old, logp32.detach() - old, adv, valid, opts)

    per_token, extras = _LOSSES[loss_type](inputs)
    kl = None
    if ref is not None:
        kl = kl_penalty(logp32, torch.where(valid, ref, 0.0), opts["kl_estimator"])
        if opts["beta"] > 0:
            per_token = per_token + opts["beta"] * kl

    agg, c = opts["agg"], opts["agg_norm_constant"]
    own_count = _count(agg, mask)
    normalizer = opts["normalizer"] if opts["normalizer"] is not None else own_count
    loss = aggregate(per_token, valid, agg, normalizer, c)

    with torch.no_grad():
        n_valid = valid.sum()
        n = n_valid.clamp_min(1).float()
        zero = torch.zeros((), device=logp.device)
        metrics: dict[str, Tensor] = {}
        for side in ("low", "high", "dual"):
            flag = extras.get(f"clipped_{side}")
            metrics[f"clip_frac_{side}"] = (flag & valid).sum() / n if flag is not None else zero
        metrics["ratio_mean_raw"], metrics["ratio_var_raw"] = _mean_var(inputs.log_ratio, valid, n)
        if "filtered_log_ratio" in extras:
            metrics["ratio_mean_filtered"], metrics["ratio_var_filtered"] = _mean_var(
                extras["filtered_log_ratio"], valid, n
            )
        if kl is not None:
            metrics["kl"] = aggregate(kl.detach(), valid, agg, own_count, c)
        metrics["nonfinite_tokens"] = (mask & ~finite).sum().float()
        metrics["num_tokens"] = n_valid.float()
    return loss, metrics
