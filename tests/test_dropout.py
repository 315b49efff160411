"""Dropout is off for every forward whose log-probs enter the ratio: two training-mode forwards with the same
weights give identical log-probs, on tiny random OPT, Falcon and BLOOM models (which keep dropout as float
attributes, not only as nn.Dropout modules); LoRA dropout is refused with one line, never zeroed silently."""

import pytest
import torch
from omegaconf import OmegaConf

from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.config import Config, LoraConfig, ModelConfig
from kpo_lightning.errors import UserInputError
from kpo_lightning.models.loading import apply_lora, disable_dropout
from kpo_lightning.models.tiny_models import build_tiny_random_model

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **SMALL,
        hidden_size=32,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        dropout=0.3,
        attention_dropout=0.3,
        activation_dropout=0.3,
        layerdrop=0.3,
    )
    return OPTForCausalLM(config)


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(**SMALL, hidden_size=32, hidden_dropout=0.3, attention_dropout=0.3))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(
        BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.3, attention_dropout=0.3)
    )


BUILDERS = {"opt": _opt, "falcon": _falcon, "bloom": _bloom}


def _train_mode_logprobs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `input_ids` from a forward in train mode (as the policy's ratio forwards run)."""
    model.train()
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_two_train_mode_forwards_give_identical_logprobs(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    input_ids = torch.randint(3, VOCAB, (2, 12))
    noisy = [_train_mode_logprobs(model, input_ids) for _ in range(2)]
    assert not torch.equal(*noisy), "the tiny config must drop out before disable_dropout, else this test shows nothing"
    disable_dropout(model)
    with torch.no_grad():
        a, b = (_train_mode_logprobs(model, input_ids) for _ in range(2))
        model.eval()
        c = _train_mode_logprobs(model, input_ids)  # train mode again inside; eval() only resets the flag
    assert torch.equal(a, b) and torch.equal(a, c)


def test_dropout_attributes_of_modules_and_configs_are_zeroed(char_tokenizer):
    model = _opt()
    disable_dropout(model)
    for obj in [*model.modules(), model.config]:
        for name, value in vars(obj).items():
            if "drop" in name and isinstance(value, float):
                assert value == 0.0, (type(obj).__name__, name)
    # the Llama policy of the shipped tasks keeps its attention dropout as a config float
    llama = build_tiny_random_model(char_tokenizer, attention_dropout=0.2)
    disable_dropout(llama)
    assert llama.config.attention_dropout == 0.0


def test_lora_dropout_is_refused_with_one_line(tiny_model):
    cfg = Config(model=ModelConfig(lora=LoraConfig(r=4, dropout=0.05)))
    with pytest.raises(UserInputError, match=r"model.lora.dropout=0.05 .*set model.lora.dropout=0.0"):
        check_config(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg)))
    with pytest.raises(UserInputError, match="model.lora.dropout=0.05"):
        apply_lora(tiny_model, cfg.model)


def test_a_peft_model_with_lora_dropout_is_refused_not_zeroed(tiny_model):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(tiny_model, PeftLoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    with pytest.raises(UserInputError, match="model.lora.dropout=0.1"):
        disable_dropout(model)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in model.modules())


def test_zero_lora_dropout_still_trains_adapters(tiny_model):
    model = disable_dropout(apply_lora(tiny_model, ModelConfig(lora=LoraConfig(r=4))))
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
