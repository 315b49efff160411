"""The training job behind `python run.py`: build the pieces from the config and hand them to a Trainer."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from kpo_lightning.cli.config_checks import RESUME_AUTO
from kpo_lightning.cli.config_loading import to_yaml
from kpo_lightning.cli.versions import startup_banner
from kpo_lightning.config import Config
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.errors import CheckpointSaveError, NonFiniteTrainingError, UserInputError
from kpo_lightning.models.export import save_hf_folder
from kpo_lightning.models.loading import load_model_and_tokenizer
from kpo_lightning.models.sharding import full_state_dict, is_sharded
from kpo_lightning.rollout.callback import RolloutCallback
from kpo_lightning.training.checkpointing import (
    DAMAGED_SUFFIX,
    RolloutCheckpoint,
    checkpoint_problem,
    checkpoint_rollout_step,
    list_checkpoints,
)
from kpo_lightning.training.module import KPOModule
from kpo_lightning.training.strategies import FSDPStrategy


def _devices(spec: str):
    spec = str(spec).strip()
    if spec == "auto" or spec == "-1":
        return spec if spec == "auto" else -1
    if "," in spec:
        return [int(d) for d in spec.split(",") if d.strip()]
    return int(spec)


def placement(cfg: Config) -> dict:
    """The Trainer arguments that say where and how the job runs (training and `mode=eval` alike): accelerator,
    devices, nodes, strategy, precision."""
    # "fsdp" is the project's FSDP2 strategy (kpo_lightning/training/strategies.py), on GPUs and on CPUs (gloo) alike.
    strategy = FSDPStrategy() if cfg.trainer.strategy == "fsdp" else cfg.trainer.strategy
    return dict(
        accelerator=cfg.trainer.accelerator,
        devices=_devices(cfg.trainer.devices),
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=cfg.trainer.precision,
    )


def build_trainer(cfg: Config, callbacks: list[pl.Callback], logger) -> pl.Trainer:
    """One Trainer "epoch" is the whole run: `trainer.max_steps` rollout steps (training batches)."""
    every = cfg.eval.every_n_steps
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=cfg.trainer.max_steps,
        limit_val_batches=1.0 if every > 0 else 0,
        val_check_interval=min(every, cfg.trainer.max_steps) if every > 0 else None,
        check_val_every_n_epoch=1 if every > 0 else None,
        num_sanity_val_steps=0,
        **placement(cfg),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # RolloutCheckpoint does it, atomically and per rollout step
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        default_root_dir=cfg.output_dir,
        use_distributed_sampler=False,  # the data module shards the prompt stream itself
    )


def resolve_resume(cfg: Config, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, checked before it is trusted (see checkpointing.checkpoint_problem).

    `resume=PATH`: that file, or one line naming it and its problem (exit 2). `resume=auto` / `auto_or_fresh`: the
    newest intact checkpoint in `ckpt_dir`; damaged newer ones are named, skipped and set aside as
    `step-N.ckpt.damaged` (so the resumed run can write that step again). None at all: start fresh. Only damaged
    ones: `auto` stops (exit 2), `auto_or_fresh` sets them aside and starts fresh.
    """
    if cfg.resume is None:
        return None
    if cfg.resume not in RESUME_AUTO:
        problem = checkpoint_problem(Path(cfg.resume))
        if problem:
            raise UserInputError(f"resume={cfg.resume}: {problem}; give an intact checkpoint, resume=auto or null")
        return Path(cfg.resume)
    found = list_checkpoints(ckpt_dir)
    damaged: list[tuple[Path, str]] = []
    chosen = None
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            chosen = path
            break
        damaged.append((path, problem))
    if chosen is None and damaged and cfg.resume == "auto":
        names = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise UserInputError(
            f"resume=auto: no intact checkpoint in {ckpt_dir} ({names}); remove them to start fresh, "
            "or set resume=auto_or_fresh"
        )
    for path, problem in damaged:
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another process of this run set it aside first
            pass
        print(f"[kpo] resume={cfg.resume}: skipped {path.name}: {problem}; set aside as {aside.name}", flush=True)
    if chosen is not None:
        print(f"[kpo] resume={cfg.resume}: continuing from {chosen}", flush=True)
    else:
        print(f"[kpo] resume={cfg.resume}: no intact checkpoint in {ckpt_dir}, starting fresh", flush=True)
    return chosen


def run_train(cfg: Config, reward_fn: Callable[..., float]) -> int:
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume = resolve_resume(cfg, ckpt_dir)  # first: a damaged resume path stops the run with nothing written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume is not None and (done := checkpoint_rollout_step(resume)) >= cfg.trainer.max_steps:  # before loading
        print(
            f"[kpo] nothing to do: {resume} is at step {done}, trainer.max_steps={cfg.trainer.max_steps}; raise "
            "trainer.max_steps to continue (final/ left as it is)",
            flush=True,
        )
        return 0

    model, tokenizer = load_model_and_tokenizer(cfg.model, precision=cfg.trainer.precision)
    datamodule = PromptDataModule(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    module = KPOModule.from_config(model, tokenizer, cfg, reward_fn)
    checkpoint = RolloutCheckpoint(ckpt_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last)
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False)
    trainer = build_trainer(cfg, [RolloutCallback(), checkpoint], logger)

    if trainer.is_global_zero:
        print(
            startup_banner(trainer, out),
            f"[kpo] TensorBoard: tensorboard --logdir {out / 'tensorboard'}",
            sep="\n",
            flush=True,
        )
    if cfg.eval.every_n_steps > 0 and resume is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the "before training" point
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    except NonFiniteTrainingError as e:
        print(f"error: {e} (last good checkpoint kept in {ckpt_dir})", file=sys.stderr)
        return 1
    except CheckpointSaveError as e:  # full disk and the like: one line, the traceback only when asked
        if cfg.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1

    # Under FSDP every process takes part in gathering the full weights; rank 0 writes them.
    weights = full_state_dict(module.policy) if is_sharded(module.policy) else None
    if trainer.is_global_zero:
        final = save_hf_folder(module.policy, tokenizer, out / "final", state_dict=weights)
        print(f"[kpo] saved the policy to {final} (AutoModelForCausalLM.from_pretrained loads it)", flush=True)
        print(f"[kpo] view the curves: tensorboard --logdir {out / 'tensorboard'}", flush=True)
    return 0
