"""What a checkpoint holds and leaves behind: the data position of the last finished step (not of the moment it
is written), and no `.tmp` file after a failed save, whichever layer the save failed in.

A stop while step N+1's rollout is sampled or scored (a SIGTERM during a stuck reward) saves step N: the batch
already handed to that rollout must not count as consumed, or the resumed run skips it. The writer's own cleanup
(`DirectCheckpointIO`) and the callback's (`RolloutCheckpoint.save`, for any writer) are checked apart, so that
neither hides the other's absence.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_run_args, write_tiny_run_inputs
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kpo_lightning.cli.main import main
from kpo_lightning.errors import CheckpointSaveError
from kpo_lightning.rollout.callback import RolloutCallback
from kpo_lightning.training import checkpointing
from kpo_lightning.training.checkpointing import DirectCheckpointIO, RolloutCheckpoint, list_checkpoints

PROMPTS_PER_STEP = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(tmp_path_factory.mktemp("ckpt-state"))


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(root, out, f"data.prompts_per_step={PROMPTS_PER_STEP}", "data.val_size=0", *extra)


def test_a_stop_during_the_next_rollout_saves_the_data_position_of_the_last_finished_step(setup, monkeypatch):
    """SIGTERM while step 4's rollout is scored (what the reward workers raise), checkpoint.every_n_steps=0: the
    one checkpoint is step 3, and its data position is 3 batches (6 prompts), not the 4 handed out by then."""
    make = RolloutCallback._make

    def sigterm_in_rollout_4(self, inputs, batch):
        rollout = make(self, inputs, batch)
        if inputs.rollout_step == 3:  # 3 steps done: this is step 4's rollout, its batch already taken
            raise SIGTERMException()
        return rollout

    monkeypatch.setattr(RolloutCallback, "_make", sigterm_in_rollout_4)
    out = setup / "sigterm-rollout"
    with pytest.raises(SystemExit):
        main(args(setup, out, "trainer.max_steps=6", "checkpoint.every_n_steps=0"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000003.ckpt"]
    state = torch.load(out / "checkpoints" / "step-000003.ckpt", map_location="cpu", weights_only=True)
    data = state["PromptDataModule"]
    assert data["batches"] == 3
    assert (data["epoch"], data["index"]) == (0, 3 * PROMPTS_PER_STEP)  # the arithmetic stream: one record a prompt


def partial_write_then(error: BaseException):
    def write(checkpoint, path):
        Path(path).write_bytes(b"\0" * 4096)  # part of the file made it to disk
        raise error

    return write


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()], ids=["ENOSPC", "Ctrl-C"]
)
def test_the_writer_removes_its_partial_file(tmp_path, monkeypatch, error):
    monkeypatch.setattr(checkpointing, "_write_file", partial_write_then(error))
    path = tmp_path / "step-000002.ckpt.tmp"
    expected = CheckpointSaveError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        DirectCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    assert list(tmp_path.iterdir()) == []


def fake_trainer(write):
    """What RolloutCheckpoint.save uses of a Trainer: the checkpoint connector's dump, the strategy's writer (here
    `write(path)`), the world size and is_global_zero."""
    return SimpleNamespace(
        _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda weights_only=False: {}),
        strategy=SimpleNamespace(save_checkpoint=lambda checkpoint, path: write(path)),
        world_size=1,
        is_global_zero=True,
    )


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.EIO, os.strerror(errno.EIO)), CheckpointSaveError),
        (RuntimeError("a writer's own failure"), RuntimeError),
    ],
    ids=["OSError", "other"],
)
def test_a_failed_save_through_any_writer_leaves_no_tmp(tmp_path, error, expected):
    """A writer other than DirectCheckpointIO (a strategy's own) fails half-way: the callback removes the .tmp,
    keeps the older checkpoint and raises (an OSError as one CheckpointSaveError line)."""
    (tmp_path / "step-000001.ckpt").write_bytes(b"older checkpoint")

    def half_written(path):
        Path(path).write_bytes(b"\0" * 4096)
        raise error

    callback = RolloutCheckpoint(tmp_path, every_n_steps=1, keep_last=2)
    with pytest.raises(expected):
        callback.save(fake_trainer(half_written), SimpleNamespace(rollout_step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001.ckpt"]
    assert (tmp_path / "step-000001.ckpt").read_bytes() == b"older checkpoint"


def final_weights_and_curves(out: Path) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = ("train/reward", "train/loss", "train/response_length", "val/accuracy")
    return weights, {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in tags}  # files may come in any order


def test_a_run_reads_nothing_from_the_global_rngs(setup, monkeypatch):
    """What the checkpoint's RNG states (torch, python, numpy) could change on resume: nothing, today. Scrambling
    all three global RNGs before every rollout (and so before every validation after it) leaves the weights and
    every curve of a 3-step run with validation bit-identical: sampling is seeded by (seed, rank, step) in a forked
    RNG, validation by its own seed, the data by (seed, epoch), dropout is off, and user rewards run in child
    processes. Restoring the states on resume therefore changes nothing either (see docs/notes/i23.md)."""
    import random

    import numpy as np

    common = ("trainer.max_steps=3", "eval.every_n_steps=2", "data.val_size=2", "eval.k=2", "optim.lr=3e-3")
    plain = setup / "rng-plain"
    assert main(args(setup, plain, *common)) == 0

    start = RolloutCallback.on_train_batch_start

    def scrambled(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + 17 * batch_idx)
        random.seed(2000 + batch_idx)
        np.random.seed(3000 + batch_idx)
        return start(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(RolloutCallback, "on_train_batch_start", scrambled)
    noisy = setup / "rng-scrambled"
    assert main(args(setup, noisy, *common)) == 0

    (w_plain, c_plain), (w_noisy, c_noisy) = final_weights_and_curves(plain), final_weights_and_curves(noisy)
    assert [s for s, _ in c_plain["train/reward"]] == [1, 2, 3] and len(c_plain["val/accuracy"]) == 2
    assert c_noisy == c_plain
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(setup / "model").state_dict()
    assert any(not torch.equal(w, initial[n]) for n, w in w_plain.items())  # it trained
    assert w_noisy.keys() == w_plain.keys()
    for name, w in w_plain.items():
        assert torch.equal(w_noisy[name], w), name
