"""Bad numbers: non-finite gradient norms skip the step and are counted; too many in a row stop the run with a
clear error, and the last good checkpoint stays."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from kpo_lightning import KPOModule, PromptDataModule
from kpo_lightning.config import DataConfig, OptimConfig, RolloutConfig
from kpo_lightning.errors import NonFiniteTrainingError
from kpo_lightning.training.checkpointing import RolloutCheckpoint, list_checkpoints


def digit_reward(prompt, completion, answer, **kwargs):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


class PoisonGradients(pl.Callback):
    """Makes every gradient NaN during the rollout steps in `steps` (1-based)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.handles = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_step + 1 in self.steps:
            self.handles = [p.register_hook(lambda g: g * float("nan")) for p in pl_module.policy.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self.handles:
            h.remove()
        self.handles = []


def fit(tmp_path, char_tokenizer, tiny_model, poison, steps, max_skipped=10):
    module = KPOModule(
        tiny_model,
        char_tokenizer,
        optim=OptimConfig(lr=1e-2, num_minibatches=2, warmup_ratio=0.0, max_skipped_steps=max_skipped),
        rollout=RolloutConfig(num_generations=4, max_new_tokens=6),
        reward_fn=digit_reward,
    )
    data = PromptDataModule(DataConfig(prompts_per_step=4, val_size=4), tokenizer=char_tokenizer)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[PoisonGradients(poison), RolloutCheckpoint(tmp_path / "ckpt", every_n_steps=1, keep_last=10)],
    )
    return module, trainer, data


def test_transient_nan_gradients_skip_steps_and_training_goes_on(tmp_path, char_tokenizer, tiny_model, capsys):
    module, trainer, data = fit(tmp_path, char_tokenizer, tiny_model, poison=[2, 3], steps=4)
    trainer.fit(module, datamodule=data)
    assert module.rollout_step == 4
    assert module.skipped_steps == 4  # 2 rollout steps x 2 optimizer steps each
    assert trainer.global_step == 4  # only the 4 good optimizer steps were taken
    assert module.last_logs["train/skipped_steps"] == 4.0
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())
    assert "non-finite gradient norm" in capsys.readouterr().out


def test_too_many_skips_in_a_row_stop_with_last_good_checkpoint(tmp_path, char_tokenizer, tiny_model):
    module, trainer, data = fit(tmp_path, char_tokenizer, tiny_model, poison=range(2, 100), steps=10, max_skipped=3)
    with pytest.raises(NonFiniteTrainingError, match="optim.max_skipped_steps=3"):
        trainer.fit(module, datamodule=data)
    ckpts = list_checkpoints(tmp_path / "ckpt")
    # step 2 skipped both its optimizer steps (weights untouched) and was saved; step 3 failed and was not
    assert [p.name for p in ckpts] == ["step-000001.ckpt", "step-000002.ckpt"]
    state = torch.load(ckpts[-1], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_checkpoint_callback_never_saves_after_non_finite_stop(tmp_path):
    """Matched by class (errors.py): even outside a step, a NonFiniteTrainingError saves nothing; another error does."""
    saved = []

    class Recording(RolloutCheckpoint):
        def save(self, trainer, pl_module):
            saved.append(type(pl_module).__name__)
            return tmp_path / "step-000001.ckpt"

    callback, module = Recording(tmp_path), SimpleNamespace(rollout_step=1)
    callback.training_started = True  # a run that trained (before that, nothing is ever saved)
    callback.on_exception(None, module, NonFiniteTrainingError("3 steps in a row"))
    assert saved == []
    callback.on_exception(None, module, RuntimeError("some other failure"))
    assert saved == ["SimpleNamespace"]
