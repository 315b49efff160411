"""Checkpoints that let a run continue as if never stopped, written atomically, the last N kept.

A checkpoint (Lightning's format) holds the policy, optimizer and scheduler, the loops' progress, the data stream
position (the DataModule's state), the module's counters and, added here, every RNG state. The reference
snapshot is not stored: it is rebuilt from `model.name_or_path`.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")


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


def latest_checkpoint(directory: Path) -> Optional[Path]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


class RolloutCheckpoint(pl.Callback):
    """Saves `step-N.ckpt` every `every_n_steps` rollout steps, at the end of training and when interrupted
    (Ctrl-C, SIGTERM, an error): write to a temporary file, then rename, so a kill mid-save leaves the last
    checkpoint intact."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50, keep_last: int = 2) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last

    def save(self, trainer: pl.Trainer, pl_module) -> Optional[Path]:
        step = pl_module.rollout_step
        path = self.dirpath / f"step-{step:06d}.ckpt"
        if path.exists():
            return path
        tmp = path.with_suffix(".ckpt.tmp")
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier("kpo_checkpoint")
        if trainer.is_global_zero:
            os.replace(tmp, path)
            for old in list_checkpoints(self.dirpath)[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mid_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_step = False
        if self.every_n_steps > 0 and pl_module.rollout_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Interrupted (Ctrl-C, SIGTERM) or failed: keep what was trained so far, but never a step cut in the
        # middle (its weights are half-updated): then the last periodic checkpoint stays the newest.
        if type(exception).__name__ == "NonFiniteTrainingError":
            return  # the weights may be broken: the last periodic checkpoint is the last good one
        if getattr(self, "_mid_step", False):
            print("[kpo] interrupted inside a step: not saved; resume continues from the last checkpoint", flush=True)
            return
        if pl_module.rollout_step > 0:
            try:
                path = self.save(trainer, pl_module)
                print(f"[kpo] saved {path} after {type(exception).__name__}", flush=True)
            except Exception as e:  # never hide the original error behind a failed save
                print(f"[kpo] could not save a checkpoint after {type(exception).__name__}: {e}", flush=True)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A run resumed with a larger trainer.max_steps must go on: the loop state saved at the old last step
        # marks that batch as the epoch's last, which would end the resumed run at once.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress is not None and progress["current"]["completed"] + 1 < trainer.num_training_batches:
            progress["is_last_batch"] = False

    def state_dict(self) -> dict:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here, after Lightning's own setup (which reseeds), so sampling continues exactly.
        states = getattr(self, "_rng_to_restore", None)
        if states is not None:
            set_rng_states(states)
            self._rng_to_restore = None
