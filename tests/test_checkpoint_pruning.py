"""RolloutCheckpoint keeps exactly the last `checkpoint.keep_last` checkpoints (a unit test: no training, the
Trainer is a stand-in that writes a small file where Lightning would write the checkpoint)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from kpo_lightning.training.checkpointing import RolloutCheckpoint, latest_checkpoint, list_checkpoints


class FakeTrainer:
    """One process; the strategy writes a small file for the checkpoint dict Lightning would build."""

    is_global_zero = True
    world_size = 1

    def __init__(self) -> None:
        self.strategy = SimpleNamespace(save_checkpoint=lambda checkpoint, path: Path(path).write_text("ckpt"))
        self._checkpoint_connector = SimpleNamespace(dump_checkpoint=lambda weights_only=False: {})


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_only_the_last_keep_last_checkpoints_remain(tmp_path, keep_last):
    cb = RolloutCheckpoint(tmp_path, every_n_steps=1, keep_last=keep_last)
    trainer, module = FakeTrainer(), SimpleNamespace(rollout_step=0)
    for step in range(1, 7):  # more saves than kept
        module.rollout_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
        kept = list(range(max(1, step - keep_last + 1), step + 1))
        assert names(tmp_path) == [f"step-{s:06d}.ckpt" for s in kept]  # no .tmp left behind either
    assert latest_checkpoint(tmp_path).name == "step-000006.ckpt"


def test_every_n_steps_and_pruning_by_step_number_not_name_order(tmp_path):
    cb = RolloutCheckpoint(tmp_path, every_n_steps=3, keep_last=2)
    trainer, module = FakeTrainer(), SimpleNamespace(rollout_step=0)
    for step in range(1, 11):
        module.rollout_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    module.rollout_step = 1000  # a longer number; pruning must order by step (999 < 1000), not by text
    (tmp_path / "step-999.ckpt").write_text("ckpt")
    cb.on_train_end(trainer, module)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-999.ckpt", "step-001000.ckpt"]
    cb.on_train_end(trainer, module)  # saving the same step again neither duplicates nor prunes
    assert names(tmp_path) == ["step-001000.ckpt", "step-999.ckpt"]
