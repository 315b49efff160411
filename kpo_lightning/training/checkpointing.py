"""Checkpoints that let a run continue as if never stopped, written atomically, checked before use, the last N kept.

A checkpoint (Lightning's format) holds the policy, optimizer and scheduler, the loops' progress, the data stream
position (the DataModule's state), the module's counters and, added here, every RNG state. The reference
snapshot is not stored: it is rebuilt from `model.name_or_path`.

Saves go to `step-N.ckpt.tmp` in the checkpoint folder itself (one write, fsynced), then `os.replace` puts them in
place: a kill or a full disk mid-save never touches the checkpoints already there. Before a resume trusts a file,
`checkpoint_problem` opens it: the zip's central directory sits at the end of the file, so a truncated or empty
file fails there; then the keys a resume needs and the step in its name are checked. Only the index and the small
pickle are read (tensors are memory-mapped, not read), so the check costs milliseconds whatever the model size; it
does not checksum the tensor bytes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kpo_lightning.errors import CheckpointSaveError, NonFiniteTrainingError

CKPT_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")
TMP_SUFFIX = ".tmp"  # step-N.ckpt.tmp: a save in progress (or cut short), never listed as a checkpoint
DAMAGED_SUFFIX = ".damaged"  # step-N.ckpt.damaged: set aside by a resume that fell back to an older checkpoint
# What a resume needs from a checkpoint: weights, optimizer and scheduler, loop progress, our counters.
REQUIRED_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "kpo")


def rng_states() -> dict:
    # Plain types and tensors only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
    return None


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


def _save_error(path: Path, reason: str, needed: int) -> CheckpointSaveError:
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
                raise _save_error(path, e.strerror or str(e), needed) from e
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


class RolloutCheckpoint(pl.Callback):
    """Saves `step-N.ckpt` every `every_n_steps` rollout steps, at the end of training and when interrupted
    (Ctrl-C, SIGTERM, an error): write to a temporary file, then rename, so a kill mid-save leaves the last
    checkpoint intact."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50, keep_last: int = 2) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._saved_step: int | None = None  # the step this run last saved (not re-saved at the end)

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        # Write in place, once (see DirectCheckpointIO); a strategy with its own writer (sharded) keeps it.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = DirectCheckpointIO()
        if trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(f"step-*.ckpt{TMP_SUFFIX}"):  # left by a kill mid-save
                _remove(stale)

    def save(self, trainer: pl.Trainer, pl_module) -> Path | None:
        step = pl_module.rollout_step
        path = self.dirpath / f"step-{step:06d}.ckpt"
        if self._saved_step == step:
            return path
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            trainer.save_checkpoint(tmp)
        except BaseException as e:
            _remove(tmp)  # whatever the writer: no partial file left to fill the disk
            if isinstance(e, OSError) and not isinstance(e, CheckpointSaveError):
                raise _save_error(path, e.strerror or str(e), _size_hint(self.dirpath)) from e
            raise
        trainer.strategy.barrier("kpo_checkpoint")
        if trainer.is_global_zero:
            os.replace(tmp, path)
            _fsync_dir(self.dirpath)
            for old in list_checkpoints(self.dirpath)[: -self.keep_last]:
                _remove(old)
        self._saved_step = step
        return path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mid_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_step = False
        # A checkpoint of step N resumes as if taken here (see normalize_loop_state), so it carries the RNG state of
        # this moment even when written later (at the end, on SIGTERM): a validation run after this step draws from
        # the global RNG (its DataLoader's seed), and the resumed run redoes that draw.
        self._rng_after_step = rng_states()
        # Likewise the data stream's position: a stop while the next rollout is sampled or scored (before any weight
        # changes) saves step N, and the batch already handed to that rollout must not count as consumed.
        datamodule = getattr(trainer, "datamodule", None)
        self._data_after_step = datamodule.state_dict() if datamodule is not None else None
        if self.every_n_steps > 0 and pl_module.rollout_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Interrupted (Ctrl-C, SIGTERM) or failed: keep what was trained so far, but never a step cut in the
        # middle (its weights are half-updated): then the last periodic checkpoint stays the newest.
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

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        normalize_loop_state(checkpoint)

    def state_dict(self) -> dict:
        states = getattr(self, "_rng_after_step", None)
        return {"rng": states if states is not None else rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here, after Lightning's own setup (which reseeds), so sampling continues exactly.
        states = getattr(self, "_rng_to_restore", None)
        if states is not None:
            set_rng_states(states)
            self._rng_to_restore = None
