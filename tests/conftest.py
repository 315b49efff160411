"""Shared fixtures: the character tokenizer and a tiny random Llama, both built in code (no downloads)."""

import pytest
import torch

from kpo_lightning.char_tokenizer import build_char_tokenizer
from kpo_lightning.tiny_models import build_tiny_random_model

torch.set_num_threads(1)


@pytest.fixture
def char_tokenizer():
    """Character-level tokenizer: pad=0, eos=1, bos=2, unk=3, left padding."""
    return build_char_tokenizer()


@pytest.fixture
def tiny_model(char_tokenizer):
    """Random tiny Llama (hidden 32, 2 layers), deterministic (seed 0), in eval mode."""
    return build_tiny_random_model(char_tokenizer, seed=0)
