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
# Every strategy and precision accepted here is trained in the test suite on CPU processes (see README, Scale).
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


# Lower bounds, checked in one loop (keys that may be null are skipped when null).
POSITIVE = (
    "loss.kalman_q",
    "loss.kalman_v",
    "loss.agg_norm_constant",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "reward.timeout_s",
    "data.prompts_per_step",
    "data.max_prompt_tokens",
    "optim.lr",
    "trainer.max_steps",
)
AT_LEAST = {
    "loss.kalman_p0": 0.0,
    "loss.beta": 0.0,
    "rollout.num_generations": 2,
    "rollout.top_k": 0,
    "rollout.generation_batch_size": 0,
    "reward.num_workers": 0,
    "data.val_size": 0,
    "data.arithmetic_max_operand": 1,
    "data.chain_min_operands": 2,
    "data.chain_curriculum_prompts": 0,
    "optim.weight_decay": 0.0,
    "optim.grad_clip": 0.0,
    "optim.num_minibatches": 1,
    "optim.epochs_per_rollout": 1,
    "optim.micro_batch_size": 0,
    "optim.max_tokens_per_micro_batch": 0,
    "optim.max_skipped_steps": 1,
    "trainer.num_nodes": 1,
    "checkpoint.every_n_steps": 0,
    "checkpoint.keep_last": 1,
    "eval.every_n_steps": 0,
    "eval.k": 1,
    "eval.temperature": 0.0,
    "eval.max_new_tokens": 0,
}


def _value(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


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
    from kpo_lightning.datamodule import _check_chat_template_kwargs
    from kpo_lightning.losses import LOSS_DEFAULTS

    for key in POSITIVE:
        _positive(key, _value(cfg, key))
    for key, low in AT_LEAST.items():
        if _value(cfg, key) is not None:
            _at_least(key, _value(cfg, key), low)
    _choice("mode", cfg.mode, MODES)
    _choice("loss.type", cfg.loss.type, sorted(LOSS_DEFAULTS))
    _choice("loss.agg", cfg.loss.agg, AGGREGATIONS)
    _choice("loss.advantage", cfg.loss.advantage, ADVANTAGES)
    _choice("loss.kl_estimator", cfg.loss.kl_estimator, KL_ESTIMATORS)
    for key in ("clip_low", "clip_high"):
        value = getattr(cfg.loss, key)
        if value is not None and not 0.0 < value < 1.0:
            _fail(f"loss.{key}", value, "a clip bound must lie in (0, 1), e.g. 0.2")
    if cfg.loss.dual_clip is not None and not (cfg.loss.dual_clip == 0 or cfg.loss.dual_clip > 1.0):
        _fail("loss.dual_clip", cfg.loss.dual_clip, "it must be > 1 (verl uses 3.0), or 0 to disable it")
    _check_strategy_and_precision(cfg)
    _check_chat_template_kwargs(cfg.data.chat_template_kwargs)
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        _fail("rollout.top_p", cfg.rollout.top_p, "it must lie in (0, 1]")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        _fail("optim.warmup_ratio", cfg.optim.warmup_ratio, "it must lie in [0, 1)")
    _check_chain(cfg)
    if cfg.data.prompts_per_step % cfg.optim.num_minibatches:
        raise UserInputError(
            f"optim.num_minibatches={cfg.optim.num_minibatches} does not divide data.prompts_per_step="
            f"{cfg.data.prompts_per_step}: groups are never split, so pick a divisor "
            f"(e.g. optim.num_minibatches={_largest_divisor(cfg.data.prompts_per_step, cfg.optim.num_minibatches)})"
        )
    if cfg.resume not in (None, "auto", "auto_or_fresh") and not Path(cfg.resume).exists():
        _fail("resume", cfg.resume,
              "that checkpoint does not exist; give an existing .ckpt file, 'auto', 'auto_or_fresh' or null")


def _check_chain(cfg: Config) -> None:
    from kpo_lightning.chain_arithmetic import MAX_OPERANDS_LIMIT

    low, high = cfg.data.chain_min_operands, cfg.data.chain_max_operands
    if not low <= high <= MAX_OPERANDS_LIMIT:
        _fail("data.chain_max_operands", high,
              f"it must lie in [data.chain_min_operands={low}, {MAX_OPERANDS_LIMIT}]")


def _check_strategy_and_precision(cfg: Config) -> None:
    strategy, precision = cfg.trainer.strategy, cfg.trainer.precision
    if str(strategy).startswith("deepspeed"):
        _fail("trainer.strategy", strategy, "DeepSpeed is not supported; use trainer.strategy=fsdp to shard the "
              "model (or ddp)")
    if strategy not in STRATEGIES:
        _fail("trainer.strategy", strategy, f"use one of {', '.join(STRATEGIES)} (fsdp shards the model with FSDP2)")
    if precision in ("16-mixed", "16", "16-true"):
        _fail("trainer.precision", precision, "float16 needs a gradient scaler the manual optimizer step does not "
              "run; use bf16-mixed (float32 master weights, bfloat16 compute)")
    if precision not in PRECISIONS:
        _fail("trainer.precision", precision, f"use one of {', '.join(PRECISIONS)}")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
