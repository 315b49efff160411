"""Weight decay by name, against the names written out for three real architectures built tiny in code.

`decay_parameter_names` (what `KPOModule.configure_optimizers` puts in the decayed group) must decay exactly the
matrices and embeddings, and never a bias or a normalisation weight, whatever the architecture calls them: Qwen3's
per-head `q_norm`/`k_norm`, Llama's `input_layernorm`/`norm` (and its optional attention biases), GPT-2's `ln_1`/
`ln_f` (LayerNorm weights and biases) and Conv1D biases. The lists below are written by hand, not computed.
"""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kpo_lightning.models.loading import decay_parameter_names

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

QWEN3_DECAYED = [
    "model.embed_tokens.weight",
    *(f"model.layers.0.self_attn.{p}.weight" for p in ATTN),
    *(f"model.layers.0.mlp.{p}.weight" for p in MLP),
    "lm_head.weight",
]
QWEN3_PLAIN = [
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.self_attn.k_norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
]
LLAMA_DECAYED = QWEN3_DECAYED
LLAMA_PLAIN = [
    *(f"model.layers.0.self_attn.{p}.bias" for p in ATTN),  # attention_bias=True
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
]
GPT2_DECAYED = [  # lm_head is tied to wte: one parameter
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_proj.weight",
]
GPT2_PLAIN = [
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight",
    "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
]

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**SMALL, num_key_value_heads=1, head_dim=8))


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=1, attention_bias=True))


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


@pytest.mark.parametrize(
    "build, decayed, plain",
    [(qwen3, QWEN3_DECAYED, QWEN3_PLAIN), (llama, LLAMA_DECAYED, LLAMA_PLAIN), (gpt2, GPT2_DECAYED, GPT2_PLAIN)],
    ids=["qwen3", "llama", "gpt2"],
)
def test_decayed_names_are_the_written_out_ones(build, decayed, plain):
    model = build()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(decayed + plain), "the architecture's parameters changed: update the lists"
    decay = set(decay_parameter_names(model))  # may also name a tied copy (GPT-2's lm_head.weight)
    assert sorted(n for n in names if n in decay) == sorted(decayed)  # as configure_optimizers picks them
