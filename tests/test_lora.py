"""LoRA through peft: only the adapters train; with beta > 0 the reference is the adapter-disabled model."""

import lightning.pytorch as pl
import torch
from transformers import AutoModelForCausalLM

from kpo_lightning import KPOModule, PromptDataModule
from kpo_lightning.config import DataConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig, RolloutConfig
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.export import save_hf_folder
from kpo_lightning.models.loading import apply_lora
from kpo_lightning.models.tiny_models import build_tiny_random_model


def digit_reward(prompt, completion, answer, **kwargs):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


class KLSeen(pl.Callback):
    def __init__(self):
        self.kl = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kl.append(pl_module.last_logs.get("train/kl"))


def test_lora_trains_adapters_only_and_uses_base_as_reference(tmp_path):
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    base = build_tiny_random_model(tok, seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    policy = apply_lora(base, ModelConfig(lora=LoraConfig(r=4, alpha=8)))
    module = KPOModule(
        policy,
        tok,
        loss=LossConfig(type="kpo", beta=0.1),
        optim=OptimConfig(lr=5e-2, num_minibatches=2, warmup_ratio=0.0),
        rollout=RolloutConfig(num_generations=4, max_new_tokens=6),
        reward_fn=digit_reward,
    )
    assert module._reference == []  # no second copy of the model
    data = PromptDataModule(DataConfig(prompts_per_step=4, val_size=4), tokenizer=tok)
    kl = KLSeen()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[kl],
    )
    trainer.fit(module, datamodule=data)

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_moved = any(("lora_B" in n) and p.abs().max() > 0 for n, p in policy.named_parameters())
    assert lora_moved, "the adapters were updated"
    for name, value in policy.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        torch.testing.assert_close(value, base_state[key], rtol=0, atol=0)  # frozen base
    assert all(v is not None for v in kl.kl) and kl.kl[-1] > 0  # reference = adapter disabled differs now

    out = save_hf_folder(policy, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
