"""Value checks on a typed config, run before anything heavy is loaded.

Types are OmegaConf's job (the dataclass schema); this file checks ranges and combinations. Every failure is
one `UserInputError` naming the key, the value and what would be valid.
"""

from __future__ import annotations

from pathlib import Path

from kpo_lightning.config import Config
from kpo_lightning.errors import UserInputError, check_choice

MODES = ("train", "eval")
RESUME_AUTO = ("auto", "auto_or_fresh")  # resume= values that pick the newest checkpoint (cli.train)
# Every strategy and precision accepted here is trained in the test suite on CPU processes (see docs/scale.md).
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


# Lower bounds, checked in one loop (keys that may be null are skipped when null). The loss.* ranges live with
# the losses (losses.OPTION_RANGES), the lists of names with their registries (losses, advantages).
POSITIVE = (
    "rollout.max_new_tokens",
    "rollout.temperature",
    "reward.timeout_s",
    "data.prompts_per_step",
    "data.max_prompt_tokens",
    "optim.lr",
    "trainer.max_steps",
)
AT_LEAST = {
    "rollout.num_generations": 2,
    "rollout.top_k": 0,
    "reward.num_workers": 0,
    "reward.worker_memory_mb": 0,
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


def check_config(cfg: Config) -> None:
    """Raise UserInputError on the first out-of-range value or inconsistent combination."""
    # imported here, not at the top: they import torch, which `run.py --help` / `--version` need not wait for
    from kpo_lightning.algorithms.advantages import ESTIMATORS
    from kpo_lightning.algorithms.losses import (
        AGG_MODES,
        KL_ESTIMATORS,
        OPTION_RANGES,
        check_loss_option,
        check_loss_type,
        kalman_options,
    )
    from kpo_lightning.data.prompt_template import _check_chat_template_kwargs
    from kpo_lightning.models.loading import check_lora_dropout

    for key in POSITIVE:
        _positive(key, _value(cfg, key))
    for key, low in AT_LEAST.items():
        if _value(cfg, key) is not None:
            _at_least(key, _value(cfg, key), low)
    check_choice("mode", cfg.mode, MODES)
    check_loss_type(cfg.loss.type)
    for name in OPTION_RANGES:
        if getattr(cfg.loss, name, None) is not None:  # not normalizer (Python API only); None = the default
            check_loss_option(name, getattr(cfg.loss, name))
    kalman_options(cfg.loss, cfg.rollout.max_new_tokens)  # kalman_tau / kalman_ref_length, not with kalman_q
    check_choice("loss.agg", cfg.loss.agg, AGG_MODES)
    check_choice("loss.advantage", cfg.loss.advantage, ESTIMATORS)
    check_choice("loss.kl_estimator", cfg.loss.kl_estimator, KL_ESTIMATORS)
    _check_strategy_and_precision(cfg)
    _check_chat_template_kwargs(cfg.data.chat_template_kwargs)
    _check_generation_batch_size(cfg.rollout.generation_batch_size)
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        _fail("rollout.top_p", cfg.rollout.top_p, "it must lie in (0, 1]")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        _fail("optim.warmup_ratio", cfg.optim.warmup_ratio, "it must lie in [0, 1)")
    _check_chain(cfg)
    check_lora_dropout(cfg.model.lora.dropout)
    if cfg.data.prompts_per_step % cfg.optim.num_minibatches:
        raise UserInputError(
            f"optim.num_minibatches={cfg.optim.num_minibatches} does not divide data.prompts_per_step="
            f"{cfg.data.prompts_per_step}: groups are never split, so pick a divisor "
            f"(e.g. optim.num_minibatches={_largest_divisor(cfg.data.prompts_per_step, cfg.optim.num_minibatches)})"
        )
    if cfg.mode == "train":
        _check_prompts_per_process(cfg)
    if cfg.resume is not None and cfg.resume not in RESUME_AUTO and not Path(cfg.resume).exists():
        _fail(
            "resume",
            cfg.resume,
            "that checkpoint does not exist; give an existing .ckpt file, 'auto', 'auto_or_fresh' or null",
        )


def _check_generation_batch_size(value: int | str) -> None:
    if value != "auto" and not (isinstance(value, int) and value >= 0):
        _fail("rollout.generation_batch_size", value, "give auto (sized by free memory), 0 (all at once) or N > 0")


def _check_chain(cfg: Config) -> None:
    from kpo_lightning.data.chain_arithmetic import MAX_OPERANDS_LIMIT

    low, high = cfg.data.chain_min_operands, cfg.data.chain_max_operands
    if not low <= high <= MAX_OPERANDS_LIMIT:
        _fail("data.chain_max_operands", high, f"it must lie in [data.chain_min_operands={low}, {MAX_OPERANDS_LIMIT}]")


def _check_strategy_and_precision(cfg: Config) -> None:
    strategy, precision = cfg.trainer.strategy, cfg.trainer.precision
    if str(strategy).startswith("deepspeed"):
        _fail(
            "trainer.strategy",
            strategy,
            "DeepSpeed is not supported; use trainer.strategy=fsdp to shard the model (or ddp)",
        )
    if strategy not in STRATEGIES:
        _fail("trainer.strategy", strategy, f"use one of {', '.join(STRATEGIES)} (fsdp shards the model with FSDP2)")
    if precision in ("16-mixed", "16", "16-true"):
        _fail(
            "trainer.precision",
            precision,
            "float16 needs a gradient scaler the manual optimizer step does not "
            "run; use bf16-mixed (float32 master weights, bfloat16 compute)",
        )
    if precision not in PRECISIONS:
        _fail("trainer.precision", precision, f"use one of {', '.join(PRECISIONS)}")


def _check_prompts_per_process(cfg: Config) -> None:
    """Each process holds an equal share of whole groups, cut into `optim.num_minibatches`: checked here when the
    number of processes is known from the config (`trainer.devices` a count or a list, times `trainer.num_nodes`),
    else when the first batch is cut."""
    devices = str(cfg.trainer.devices).strip()
    if devices.isdigit():
        count = int(devices)
    elif "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:  # "auto", -1: known only once Lightning has looked at the machine
        return
    processes = count * cfg.trainer.num_nodes
    prompts, minibatches = cfg.data.prompts_per_step, cfg.optim.num_minibatches
    if prompts % processes == 0 and (prompts // processes) % minibatches == 0:
        return
    unit = processes * minibatches  # the smallest usable data.prompts_per_step
    raise UserInputError(
        f"data.prompts_per_step={prompts} over {processes} processes (trainer.devices={cfg.trainer.devices} x "
        f"trainer.num_nodes={cfg.trainer.num_nodes}) with optim.num_minibatches={minibatches}: every process needs "
        f"a whole number of groups per mini-batch; use data.prompts_per_step={unit * -(-prompts // unit)} "
        f"or fewer mini-batches or processes"
    )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
