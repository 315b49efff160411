"""Checkpoints that let a run continue as if never stopped, written atomically, checked before use, the last N kept.

A checkpoint (Lightning's format) holds the policy, optimizer and scheduler, the loops' progress, the data stream
position (the DataModule's state) and the module's counters. No RNG state: nothing a run draws comes from the
global RNGs (sampling is seeded by (seed, rank, step) in a forked RNG, validation by its own seed, the data by
(seed, epoch); `tests/test_checkpoint_state.py` scrambles them before every rollout and gets the same run bit for
bit), so there is nothing to restore, on any number of GPUs. The reference snapshot is not stored: it is rebuilt
from `model.name_or_path`.

Saves go to `step-N.ckpt.tmp` in the checkpoint folder itself (one write, fsynced), then `os.replace` puts them in
place: a kill or a full disk mid-save never touches the checkpoints already there. Before a resume trusts a file,
`checkpoint_problem` opens it: the zip's central directory sits at the end of the file, so a truncated or empty
file fails there; then the keys a resume needs and the step in its name are checked, and every record of the zip is
read and checked against its CRC-32 (zipfile's `testzip`), so damage inside the file (a zeroed record header, flipped
bytes in a tensor) is found before a resume trusts it. That reads the whole file once: about as long as loading it.
A restore that fails all the same is handled like a failed check by the caller (see `cli.train`).

A checkpoint is written only from a state that is complete: a fresh run's trained steps, or a restore that finished
(`RolloutCheckpoint.on_exception` saves nothing when the run stopped before training started, e.g. a restore that
failed half-way). From the moment a run resumes, "the state after the last finished step" (the data position) is
the restored one, so a stop during the first rollout after a resume saves exactly what was restored.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kpo_lightning.errors import CheckpointSaveError, NonFiniteTrainingError

CKPT_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")
TMP_SUFFIX = ".tmp"  # step-N.ckpt.tmp: a save in progress (or cut short), never listed as a checkpoint
DAMAGED_SUFFIX = ".damaged"  # step-N.ckpt.damaged: set aside by a resume that fell back to an older checkpoint
# What a resume needs from a checkpoint: weights, optimizer and scheduler, loop progress, our counters.
REQUIRED_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "kpo")
CONFIG_KEY = "kpo_config"  # the resolved config (YAML text) the checkpoint was written under


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (never the .tmp of a save in progress), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_rollout_step(path: Path) -> int:
    """The rollout step a checkpoint was taken at (from its name when it is ours, else from its contents)."""
    m = CKPT_PATTERN.match(Path(path).name)
    if m:
        return int(m.group(1))
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return int(state.get("kpo", {}).get("rollout_step", 0))


def latest_checkpoint(directory: Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` looks like a checkpoint a run can resume from, else what is wrong with it, in a few words."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint (a folder a strategy wrote): Lightning checks it when it loads it
        return None if any(path.iterdir()) else "empty folder"
    if not path.is_file():
        return "not a file" if path.exists() else "does not exist"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot be read, truncated or not a checkpoint ({first[:160]})"
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a training checkpoint"
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        return f"not a kpo-lightning training checkpoint (missing {', '.join(missing)})"
    step = state["kpo"].get("rollout_step") if isinstance(state["kpo"], dict) else None
    if not isinstance(step, int):
        return "not a kpo-lightning training checkpoint (no rollout step recorded)"
    m = CKPT_PATTERN.match(path.name)
    if m and int(m.group(1)) != step:
        return f"its name says step {int(m.group(1))} but it holds step {step}"
    return _record_damage(path)


def _record_damage(path: Path) -> str | None:
    """Reads every record of the checkpoint's zip and checks its CRC-32: None when all are intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, ValueError) as e:
        return f"damaged inside ({str(e).strip()[:160] or type(e).__name__})"
    return f"damaged inside (record {bad} fails its CRC check)" if bad is not None else None


def _tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict, shared storages counted once: what a save writes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _save_error(path: Path, reason: str, needed: int, err: int | None = None) -> CheckpointSaveError:
    if err in PERMISSION_ERRNOS:  # not a space problem: say so, rather than "free space"
        return CheckpointSaveError(
            f"could not save checkpoint {path.name.removesuffix(TMP_SUFFIX)} in {path.parent}: no permission to "
            f"write there ({reason}); the earlier checkpoints are intact: make the folder writable or point "
            "output_dir at a writable folder, then resume=auto"
        )
    free = shutil.disk_usage(path.parent).free
    return CheckpointSaveError(
        f"could not save checkpoint {path.name.removesuffix(TMP_SUFFIX)} in {path.parent}: {reason} (free there: "
        f"{_size(free)}, a checkpoint needs about {_size(needed)}); the earlier checkpoints are intact: free space or "
        "point output_dir at a bigger disk, then resume=auto"
    )


def _write_file(checkpoint: dict, path: Path) -> None:
    """One write, straight to `path` (no staging in the system temporary folder), flushed to the disk."""
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirectCheckpointIO(TorchCheckpointIO):
    """Lightning's torch writer without its staging: checks free space, then writes the file once, in place.

    (Lightning's default writes through an fsspec transaction, which stages the file in the system temporary
    folder and copies it: a small /tmp fails a save the output disk had room for, and every save is written twice.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = _tensor_bytes(checkpoint)
        if shutil.disk_usage(path.parent).free < needed:  # cheap, and fails before anything is written
            raise _save_error(path, "not enough free space", needed)
        try:
            _write_file(checkpoint, path)
        except BaseException as e:
            path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _save_error(path, e.strerror or str(e), needed, e.errno) from e
            raise


def _remove(path: Path) -> None:
    """Deletes a checkpoint file, or the folder a sharded strategy wrote; gone already is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size_hint(directory: Path) -> int:
    """The size of the newest checkpoint in `directory` (0 if none): about what the next one needs."""
    newest = latest_checkpoint(directory)
    try:
        if newest is None:
            return 0
        files = newest.rglob("*") if newest.is_dir() else [newest]
        return sum(f.stat().st_size for f in files if f.is_file())
    except OSError:
        return 0


def normalize_loop_state(checkpoint: dict) -> None:
    """Rewrites Lightning's loop progress as if the checkpoint had been taken at the end of rollout step N, mid-epoch.

    The whole run is one Lightning epoch of `trainer.max_steps` batches. A checkpoint written when a run ended
    (normally, or by SIGTERM after the epoch's last batch) records that epoch as finished, and Lightning would then
    stop a resumed run at once ("max_epochs=1 reached") however far `trainer.max_steps` was raised; one written
    between steps records different counters again. Every ending is mapped to the one state a periodic checkpoint
    has (batch N processed, not yet counted completed; epoch 0 running), which Lightning resumes at batch N+1.
    """
    step = checkpoint.get("kpo", {}).get("rollout_step")
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(step, int) or step <= 0 or not isinstance(fit, dict) or "epoch_loop.batch_progress" not in fit:
        return
    batch = fit["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        batch[part].update(ready=step, started=step, processed=step, completed=step - 1)
    batch["is_last_batch"] = False
    fit.setdefault("epoch_loop.state_dict", {})["_batches_that_stepped"] = step - 1
    if "epoch_progress" in fit:
        for part in ("total", "current"):
            fit["epoch_progress"][part].update(ready=1, started=1, processed=0, completed=0)
    checkpoint["epoch"] = 0


def saved_config(path: Path) -> str | None:
    """The resolved config (YAML) a checkpoint was written under, None for a folder or one written before it was
    stored (read from the memory-mapped file: milliseconds)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    config = state.get(CONFIG_KEY) if isinstance(state, dict) else None
    return config if isinstance(config, str) else None


def _failed_ranks(trainer: pl.Trainer, failed: bool) -> list[int]:
    """The ranks whose part of a save failed; every rank calls this (one all-gather), so every rank learns it."""
    if trainer.world_size == 1:
        return [0] if failed else []
    flags = trainer.strategy.all_gather(torch.tensor([int(failed)], device=trainer.strategy.root_device))
    return [rank for rank, flag in enumerate(flags.flatten().tolist()) if flag]


class RolloutCheckpoint(pl.Callback):
    """Saves `step-N.ckpt` every `every_n_steps` rollout steps, at the end of training and when interrupted
    (Ctrl-C, SIGTERM, an error): write to a temporary file, then rename, so a kill mid-save leaves the last
    checkpoint intact. `run_config` (the resolved config as YAML) is stored in each checkpoint, so a resume can name
    what changed since."""

    def __init__(
        self, dirpath: str | Path, every_n_steps: int = 50, keep_last: int = 2, run_config: str | None = None
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.run_config = run_config
        self._saved_step: int | None = None  # the step this run last saved (not re-saved at the end)
        self.training_started = False  # True once the state is whole: fresh, or restored completely

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        # Write in place, once (see DirectCheckpointIO); a strategy with its own writer (sharded) keeps it.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = DirectCheckpointIO()
        if trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(f"step-*.ckpt{TMP_SUFFIX}"):  # left by a kill mid-save
                _remove(stale)

    def save(self, trainer: pl.Trainer, pl_module) -> Path | None:
        """Writes step-N.ckpt on every rank's say-so: a write that fails on any rank stops every rank (raises)."""
        step = pl_module.rollout_step
        path = self.dirpath / f"step-{step:06d}.ckpt"
        if self._saved_step == step:
            return path
        tmp = path.with_name(path.name + TMP_SUFFIX)
        error: Exception | None = None
        try:
            # Trainer.save_checkpoint without its closing barrier: a rank whose write failed would leave the others
            # waiting there until the process group times out; instead every rank learns below whether all wrote.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, tmp)
        except Exception as e:
            error = e
        except BaseException:  # Ctrl-C, SystemExit mid-save: no partial file left to fill the disk
            _remove(tmp)
            raise
        failed = _failed_ranks(trainer, error is not None)
        if failed:
            _remove(tmp)  # whatever the writer: no partial file left to fill the disk
            if error is None:
                raise CheckpointSaveError(
                    f"could not save checkpoint {path.name} in {self.dirpath}: rank {', '.join(map(str, failed))} "
                    "failed to write it (its own message says why); the earlier checkpoints are intact"
                )
            if isinstance(error, OSError) and not isinstance(error, CheckpointSaveError):
                raise _save_error(path, error.strerror or str(error), _size_hint(self.dirpath), error.errno) from error
            raise error
        if trainer.is_global_zero:
            os.replace(tmp, path)
            _fsync_dir(self.dirpath)
            for old in list_checkpoints(self.dirpath)[: -self.keep_last]:
                _remove(old)
        self._saved_step = step
        return path

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning calls this after the whole restore (weights, data, callbacks, optimizer, loops): from here on
        # the state is one a checkpoint may be written from.
        self.training_started = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mid_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_step = False
        # A checkpoint of step N resumes as if taken here (see normalize_loop_state), so it carries the data stream's
        # position of this moment even when written later (at the end, on SIGTERM): a stop while the next rollout is
        # sampled or scored (before any weight changes) saves step N, and the batch already handed to that rollout
        # must not count as consumed.
        datamodule = getattr(trainer, "datamodule", None)
        self._data_after_step = datamodule.state_dict() if datamodule is not None else None
        if self.every_n_steps > 0 and pl_module.rollout_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Interrupted (Ctrl-C, SIGTERM) or failed: keep what was trained so far, but never a step cut in the
        # middle (its weights are half-updated): then the last periodic checkpoint stays the newest.
        if not self.training_started:
            # Stopped before training began: a restore that failed half-way leaves a mix of restored and fresh
            # state (Lightning restores the module's counters before the weights), which must never be saved.
            return
        if isinstance(exception, NonFiniteTrainingError):
            return  # the weights may be broken: the last periodic checkpoint is the last good one
        if isinstance(exception, CheckpointSaveError):
            return  # a save just failed: trying again would fail the same way
        if getattr(self, "_mid_step", False):
            print("[kpo] interrupted inside a step: not saved; resume continues from the last checkpoint", flush=True)
            return
        if pl_module.rollout_step > 0:
            try:
                path = self.save(trainer, pl_module)
                print(f"[kpo] saved {path} after {type(exception).__name__}", flush=True)
            except Exception as e:  # never hide the original error behind a failed save
                print(f"[kpo] could not save a checkpoint after {type(exception).__name__}: {e}", flush=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = getattr(self, "_data_after_step", None)
        key = type(trainer.datamodule).__qualname__ if getattr(trainer, "datamodule", None) is not None else None
        if state and key in checkpoint:
            checkpoint[key] = state
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        normalize_loop_state(checkpoint)
        # The restored data position is "after the last finished step" until this run finishes one: a stop during
        # the first rollout after a resume saves it, not the position of the batch that rollout already took.
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            self._data_after_step = checkpoint.get(type(datamodule).__qualname__)
