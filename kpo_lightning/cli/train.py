"""The training job behind `python run.py`: build the pieces from the config and hand them to a Trainer."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
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
    saved_config,
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


# Keys a resumed run may set differently from the run it continues and still be that run's continuation (listed
# once when a run resumes). Other changes are allowed and named; those that change the saved state's shape are
# refused (see check_resume_fits).
RESUME_MAY_CHANGE = (
    "trainer.max_steps",
    "optim.lr",
    "optim.max_skipped_steps",
    "checkpoint.every_n_steps",
    "checkpoint.keep_last",
    "eval.every_n_steps",
    "log.*",
    "reward.timeout_s",
    "trainer.log_every_n_steps",
    "output_dir",
    "resume",
    "debug",
)
# Keys that decide the shapes of the saved weights: the first suspects when a checkpoint does not fit the model.
SHAPE_KEYS = ("model.name_or_path", "model.gguf_file", "model.lora.r", "model.lora.target_modules")


def check_output_dir(out: Path) -> None:
    """One line (exit 2) unless this process may write in output_dir, its checkpoints/ and tensorboard/ folders
    (or the nearest existing folder above one not made yet): found at start, not at the first save."""
    for folder in (out, out / "checkpoints", out / "tensorboard"):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserInputError(f"output_dir={out}: {existing} is not a folder; set output_dir to a folder")
        if not os.access(existing, os.W_OK | os.X_OK):  # permission bits, and read-only mounts for root too
            raise UserInputError(
                f"output_dir={out}: no permission to write in {existing} (permission denied or read-only); make it "
                "writable or set output_dir to a writable folder"
            )


def _set_aside(path: Path, problem: str, resume: str) -> None:
    """Renames a damaged checkpoint to step-N.ckpt.damaged (kept for inspection, no longer listed) and says so."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process of this run set it aside first
        pass
    except OSError as e:
        raise UserInputError(
            f"resume={resume}: {path.name} is damaged ({problem}) and cannot be set aside as {aside.name}: "
            f"{e.strerror or e} in {path.parent}; make that folder writable, or remove {path.name}"
        ) from e
    print(f"[kpo] resume={resume}: skipped {path.name}: {problem}; set aside as {aside.name}", flush=True)


def resolve_resume(cfg: Config, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, checked before it is trusted (see checkpointing.checkpoint_problem).

    `resume=PATH`: that file, or one line naming it and its problem (exit 2). `resume=auto` / `auto_or_fresh`: the
    newest intact checkpoint in `ckpt_dir`; damaged newer ones are named, skipped and set aside as
    `step-N.ckpt.damaged` (so the resumed run can write that step again). None at all: start fresh. Only damaged
    ones: `auto` stops (exit 2), `auto_or_fresh` sets them aside and starts fresh. `resume` unset while `ckpt_dir`
    holds checkpoints: one line (exit 2), since a fresh run there would prune and overwrite the other run's files.
    """
    if cfg.resume is None:
        found = list_checkpoints(ckpt_dir)
        if found:
            raise UserInputError(
                f"output_dir={cfg.output_dir} already holds checkpoints of a run ({found[-1].name}, {len(found)} in "
                "all): set resume=auto to continue that run, or set output_dir to a new folder to start another"
            )
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
        _set_aside(path, problem, cfg.resume)
    if chosen is not None:
        print(f"[kpo] resume={cfg.resume}: continuing from {chosen}", flush=True)
    else:
        print(f"[kpo] resume={cfg.resume}: no intact checkpoint in {ckpt_dir}, starting fresh", flush=True)
    return chosen


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved_yaml: str | None, cfg: Config) -> dict[str, tuple]:
    """Keys whose value differs from the config the checkpoint was written under: {key: (saved, now)}."""
    if saved_yaml is None:
        return {}
    saved, now = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(to_yaml(cfg)) or {})
    return {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_MAY_CHANGE)


def report_resume_changes(changes: dict[str, tuple], resume: Path) -> None:
    """One line at a resume's start: the keys that may change, and what changed since the checkpoint."""

    def shown(keys):
        return ", ".join(f"{k} ({changes[k][0]} -> {changes[k][1]})" for k in keys)

    free = [k for k in changes if _may_change(k)]
    other = [k for k in changes if not _may_change(k)]
    line = f"[kpo] resuming {resume.name}; keys that may change on a resume: {', '.join(RESUME_MAY_CHANGE)}"
    line += f"; changed: {shown(free)}" if free else "; none changed"
    if other:
        line += f"; also changed (the resumed run is then not the saved run's continuation): {shown(other)}"
    print(line, flush=True)


def check_resume_fits(module: pl.LightningModule, resume: Path, changes: dict[str, tuple]) -> None:
    """One line (exit 2) when the checkpoint's weights do not fit the model this config builds (another model, LoRA
    rank or targets), before Lightning starts restoring; names the changed model keys. Nothing is written."""
    if not resume.is_file():  # a sharded checkpoint folder: Lightning checks it while loading
        return
    saved = torch.load(resume, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    reshaped = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if not (missing or extra or reshaped):
        return
    suspects = [k for k in changes if k in SHAPE_KEYS]
    if suspects:
        named = ", ".join(f"{k} ({changes[k][0]} -> {changes[k][1]})" for k in suspects)
        raise UserInputError(
            f"resume: {resume} was saved with other model settings: {named}; resume with the values it was saved "
            "with, or set output_dir to a new folder to train the new model"
        )
    parts = [
        f"{len(v)} {what} (first: {v[0]})"
        for v, what in ((missing, "missing"), (extra, "extra"), (reshaped, "of another shape"))
        if v
    ]
    raise UserInputError(
        f"resume: the weights in {resume} do not fit the model built from model.* ({'; '.join(parts)}); resume with "
        "the model settings it was saved with, or give another checkpoint"
    )


def _failed_in_restore(error: BaseException) -> bool:
    """Did `error` come out of Lightning's checkpoint restore (loading the file, weights, optimizer, loops)?"""
    frames = traceback.extract_tb(error.__traceback__)
    return any(Path(f.filename).name == "checkpoint_connector.py" for f in frames)


def _restore_failed(cfg: Config, resume: Path, ckpt_dir: Path, error: Exception, world_size: int) -> None:
    """A checkpoint that passed its checks failed to restore; nothing was saved (RolloutCheckpoint.on_exception).

    Weights that do not fit the model (a changed model the shape check could not see, e.g. a sharded folder) are
    one line and set nothing aside, since the file is fine. Otherwise `resume=auto` treats the file like one that
    failed its check: set aside, and the caller continues from the next intact checkpoint (one process only); with
    none left, or `resume=PATH`, or several processes, one line. Returns only when the caller should retry.
    """
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    if "loading state_dict" in first:
        raise UserInputError(
            f"resume: the weights in {resume} do not fit the model built from model.* ({first}); resume with the "
            "model settings it was saved with, or give another checkpoint"
        ) from error
    if cfg.resume in RESUME_AUTO and world_size == 1 and resume.parent == ckpt_dir:
        _set_aside(resume, f"could not be restored ({first})", cfg.resume)
        if cfg.resume == "auto" and not any(checkpoint_problem(p) is None for p in list_checkpoints(ckpt_dir)):
            raise UserInputError(
                f"resume=auto: {resume.name} could not be restored ({first}) and no older intact checkpoint is in "
                f"{ckpt_dir}; set resume=auto_or_fresh to start fresh"
            ) from error
        return
    raise UserInputError(
        f"resume={cfg.resume}: {resume} could not be restored ({first}); give another checkpoint, or rename it to "
        f"{resume.name}{DAMAGED_SUFFIX} and resume=auto to continue from the one before"
    ) from error


def run_train(cfg: Config, reward_fn: Callable[..., float]) -> int:
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    check_output_dir(out)
    resume = resolve_resume(cfg, ckpt_dir)  # first: a damaged resume path stops the run with nothing written
    changes = config_changes(saved_config(resume), cfg) if resume is not None else {}
    out.mkdir(parents=True, exist_ok=True)
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
    if resume is not None:
        check_resume_fits(module, resume, changes)
    (out / "config.yaml").write_text(to_yaml(cfg))  # after the checks: a refused resume keeps the run's config.yaml
    checkpoint = RolloutCheckpoint(
        ckpt_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last, run_config=to_yaml(cfg)
    )
    # A resume drops whatever the event files hold from the checkpoint's next step on (logged by the run after that
    # checkpoint was written), so each step appears once even after a resume from an older checkpoint.
    purge = {"purge_step": checkpoint_rollout_step(resume) + 1} if resume is not None else {}
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False, **purge)
    trainer = build_trainer(cfg, [RolloutCallback(), checkpoint], logger)

    if trainer.is_global_zero:
        print(
            startup_banner(trainer, out),
            f"[kpo] TensorBoard: tensorboard --logdir {out / 'tensorboard'}",
            sep="\n",
            flush=True,
        )
        if resume is not None:
            report_resume_changes(changes, resume)
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
    except Exception as e:
        if resume is None or checkpoint.training_started or not _failed_in_restore(e):
            raise
        _restore_failed(cfg, resume, ckpt_dir, e, trainer.world_size)
        return run_train(cfg, reward_fn)  # resume=auto: from the next intact checkpoint

    # Under FSDP every process takes part in gathering the full weights; rank 0 writes them.
    weights = full_state_dict(module.policy) if is_sharded(module.policy) else None
    if trainer.is_global_zero:
        final = save_hf_folder(module.policy, tokenizer, out / "final", state_dict=weights)
        print(f"[kpo] saved the policy to {final} (AutoModelForCausalLM.from_pretrained loads it)", flush=True)
        print(f"[kpo] view the curves: tensorboard --logdir {out / 'tensorboard'}", flush=True)
    return 0
