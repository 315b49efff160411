"""End to end: the module in a user's own Trainer, and `run.py` for a few steps with TensorBoard output."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from kpo_lightning import KPOModule, PromptDataModule
from kpo_lightning.cli.main import main
from kpo_lightning.config import DataConfig, LossConfig, OptimConfig, RolloutConfig


def test_module_in_a_users_own_trainer(char_tokenizer, tiny_model, tmp_path):
    # The README's "use the module in your own Trainer" example, as written there.
    module = KPOModule(
        tiny_model,
        char_tokenizer,
        loss=LossConfig(type="kpo_clipped"),
        optim=OptimConfig(lr=1e-3, num_minibatches=2),
        rollout=RolloutConfig(num_generations=4, max_new_tokens=8),
    )
    data = PromptDataModule(DataConfig(source="arithmetic", prompts_per_step=4, val_size=8), tokenizer=char_tokenizer)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    assert module.rollout_step == 3
    assert trainer.global_step == 3 * 2  # one optimizer step per mini-batch
    changed = any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    assert changed


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_run_py_few_steps_writes_tensorboard_and_final_model(char_tokenizer, tiny_model, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    code = main(
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "trainer.max_steps=4",
            "data.prompts_per_step=4",
            "data.val_size=8",
            "rollout.num_generations=4",
            "rollout.max_new_tokens=6",
            "optim.num_minibatches=2",
            "optim.lr=1e-3",
            "eval.every_n_steps=2",
            "eval.k=2",
            "checkpoint.every_n_steps=2",
            "log.samples_every_n_steps=2",
            "log.ratio_plot_every_n_steps=2",
        ]
    )
    assert code == 0
    assert (out / "config.yaml").exists()
    scalars, acc = _scalars(out / "tensorboard")
    for tag in [
        "train/reward",
        "train/ratio_var_raw",
        "train/ratio_var_filtered",
        "train/ratio_mean_raw",
        "train/ratio_mean_filtered",
        "train/switch_freq_raw",
        "train/switch_freq_filtered",
        "train/clip_frac",
        "train/reward_std",
        "train/zero_var_group_frac",
        "train/response_length",
        "train/loss",
        "train/entropy",
        "train/grad_norm",
        "train/lr",
        "train/tokens_per_second",
        "val/accuracy",
    ]:
        assert tag in scalars, (tag, sorted(scalars))
    assert [s for s, _ in scalars["train/reward"]] == [1, 2, 3, 4]  # one point per rollout step
    assert [s for s, _ in scalars["val/accuracy"]] == [0, 2, 4]  # before training and every 2 steps
    assert acc.Tags()["images"], "the raw-vs-filtered ratio figure is logged"
    assert any("samples" in t for t in acc.Tags()["tensors"]), acc.Tags()
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.vocab_size == tiny_model.config.vocab_size
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.ckpt", "step-000004.ckpt"]


def test_export_a_checkpoint_to_a_hf_folder(char_tokenizer, tiny_model, tmp_path):
    from kpo_lightning.models.export import load_policy_weights, save_hf_folder
    from kpo_lightning.models.tiny_models import build_tiny_random_model
    from kpo_lightning.training.checkpointing import RolloutCheckpoint

    module = KPOModule(
        tiny_model,
        char_tokenizer,
        optim=OptimConfig(lr=1e-2, num_minibatches=2),
        rollout=RolloutConfig(num_generations=4, max_new_tokens=6),
        reward_fn=lambda prompt, completion, answer: float(len(completion) % 2),
    )
    data = PromptDataModule(DataConfig(prompts_per_step=4, val_size=4), tokenizer=char_tokenizer)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[RolloutCheckpoint(tmp_path / "ckpt", every_n_steps=2)],
    )
    trainer.fit(module, datamodule=data)
    fresh = build_tiny_random_model(char_tokenizer, seed=123)
    out = save_hf_folder(
        load_policy_weights(fresh, tmp_path / "ckpt" / "step-000002.ckpt"), char_tokenizer, tmp_path / "exported"
    )
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_from_config_builds_the_module_a_run_config_describes(char_tokenizer, tiny_model):
    """KPOModule.from_config takes every section run.py passes (and the seed), and builds the subclass it is
    called on."""
    from kpo_lightning.cli.config_loading import load_config

    cfg = load_config(["loss.type=grpo", "loss.clip_low=0.3", "optim.lr=0.5", "rollout.max_new_tokens=7", "seed=11"])

    class Mine(KPOModule):
        pass

    module = Mine.from_config(tiny_model, char_tokenizer, cfg)
    assert type(module) is Mine
    assert module.loss_cfg.type == "grpo" and module.loss_options["clip_low"] == 0.3
    assert module.optim_cfg.lr == 0.5 and module.rollout_cfg.max_new_tokens == 7 and module.seed == 11
    assert (module.eval_cfg, module.log_cfg) == (cfg.eval, cfg.log)
