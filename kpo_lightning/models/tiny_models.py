"""Tiny Llama models built from a config in code (no hub download): random ones for tests, and the architecture
of the shipped `tiny-arith` model (see scripts/make_tiny_model.py)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A very small Llama config (hidden 32, 2 layers, 2 heads, MLP 64): fast enough for unit tests.

    Keyword overrides replace any LlamaConfig field (e.g. hidden_size=128, num_hidden_layers=4).
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_random_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama matched to `tokenizer`: vocab size and pad/eos/bos ids, also in its
    generation_config (so `generate` stops at eos and pads with pad without warnings). Deterministic in `seed`."""
    special = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    config = tiny_llama_config(len(tokenizer), **{**special, **overrides})
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id
    )
    model.eval()
    return model


def plain_sampling_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """The generation defaults the shipped tiny policies save: plain temperature-1.0 sampling, no top-k/top-p."""
    return GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
    )
