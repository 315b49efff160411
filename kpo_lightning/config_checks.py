"""Value checks on a typed config, run before anything heavy is loaded.

Types are OmegaConf's job (the dataclass schema); this file checks ranges and combinations. Every failure is
one `UserInputError` naming the key, the value and what would be valid.
"""

from __future__ import annotations

from pathlib import Path

from kpo_lightning.config import Config
from kpo_lightning.errors import UserInputError

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADVANTAGES = ("grpo", "dr_grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
MODES = ("train", "eval")


def _fail(key: str, value, fix: str) -> None:
    raise UserInputError(f"{key}={value!r} is invalid: {fix}")


def _positive(key: str, value) -> None:
    if value is not None and not value > 0:
        _fail(key, value, "it must be > 0")


def _at_least(key: str, value, low) -> None:
    if value < low:
        _fail(key, value, f"it must be >= {low}")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        _fail(key, value, f"use one of {', '.join(choices)}")


def check_config(cfg: Config) -> None:
    """Raise UserInputError on the first out-of-range value or inconsistent combination."""
    from kpo_lightning.losses import LOSS_DEFAULTS

    _choice("mode", cfg.mode, MODES)
    _choice("loss.type", cfg.loss.type, sorted(LOSS_DEFAULTS))
    _choice("loss.agg", cfg.loss.agg, AGGREGATIONS)
    _choice("loss.advantage", cfg.loss.advantage, ADVANTAGES)
    _choice("loss.kl_estimator", cfg.loss.kl_estimator, KL_ESTIMATORS)
    _positive("loss.kalman_q", cfg.loss.kalman_q)
    _positive("loss.kalman_v", cfg.loss.kalman_v)
    if cfg.loss.kalman_p0 is not None:
        _at_least("loss.kalman_p0", cfg.loss.kalman_p0, 0.0)
    for key in ("clip_low", "clip_high"):
        value = getattr(cfg.loss, key)
        if value is not None and not 0.0 < value < 1.0:
            _fail(f"loss.{key}", value, "a clip bound must lie in (0, 1), e.g. 0.2")
    if cfg.loss.dual_clip is not None and not (cfg.loss.dual_clip == 0 or cfg.loss.dual_clip > 1.0):
        _fail("loss.dual_clip", cfg.loss.dual_clip, "it must be > 1 (verl uses 3.0), or 0 to disable it")
    _at_least("loss.beta", cfg.loss.beta, 0.0)
    if cfg.loss.agg_norm_constant is not None:
        _positive("loss.agg_norm_constant", cfg.loss.agg_norm_constant)

    _at_least("rollout.num_generations", cfg.rollout.num_generations, 2)
    _positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    _positive("rollout.temperature", cfg.rollout.temperature)
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        _fail("rollout.top_p", cfg.rollout.top_p, "it must lie in (0, 1]")
    _at_least("rollout.top_k", cfg.rollout.top_k, 0)
    _at_least("rollout.generation_batch_size", cfg.rollout.generation_batch_size, 0)
    _positive("reward.timeout_s", cfg.reward.timeout_s)

    _positive("data.prompts_per_step", cfg.data.prompts_per_step)
    _positive("data.max_prompt_tokens", cfg.data.max_prompt_tokens)
    _at_least("data.val_size", cfg.data.val_size, 0)
    _at_least("data.arithmetic_max_operand", cfg.data.arithmetic_max_operand, 1)

    _positive("optim.lr", cfg.optim.lr)
    _at_least("optim.weight_decay", cfg.optim.weight_decay, 0.0)
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        _fail("optim.warmup_ratio", cfg.optim.warmup_ratio, "it must lie in [0, 1)")
    _at_least("optim.grad_clip", cfg.optim.grad_clip, 0.0)
    _at_least("optim.num_minibatches", cfg.optim.num_minibatches, 1)
    _at_least("optim.epochs_per_rollout", cfg.optim.epochs_per_rollout, 1)
    _at_least("optim.micro_batch_size", cfg.optim.micro_batch_size, 0)
    _at_least("optim.max_tokens_per_micro_batch", cfg.optim.max_tokens_per_micro_batch, 0)
    _at_least("optim.max_skipped_steps", cfg.optim.max_skipped_steps, 1)
    if cfg.data.prompts_per_step % cfg.optim.num_minibatches:
        raise UserInputError(
            f"optim.num_minibatches={cfg.optim.num_minibatches} does not divide data.prompts_per_step="
            f"{cfg.data.prompts_per_step}: groups are never split, so pick a divisor "
            f"(e.g. optim.num_minibatches={_largest_divisor(cfg.data.prompts_per_step, cfg.optim.num_minibatches)})"
        )

    _positive("trainer.max_steps", cfg.trainer.max_steps)
    _at_least("trainer.num_nodes", cfg.trainer.num_nodes, 1)
    _at_least("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps, 0)
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    _at_least("eval.every_n_steps", cfg.eval.every_n_steps, 0)
    _at_least("eval.k", cfg.eval.k, 1)
    _at_least("eval.temperature", cfg.eval.temperature, 0.0)
    _at_least("eval.max_new_tokens", cfg.eval.max_new_tokens, 0)

    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        _fail("resume", cfg.resume, "that checkpoint does not exist; give an existing .ckpt file, 'auto' or null")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
