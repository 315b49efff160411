"""Prompt text to token ids: one rule, used by the sampler, the prompt-length check and (through the sampler's
ids) the log-prob computation, so all three see exactly the same prompt tokens.

The rule: a prompt gets the special tokens its tokenizer adds by default (`add_special_tokens=True`: the BOS of
Llama/Mistral/Gemma-style tokenizers, nothing for Qwen/SmolLM2/GPT-2-style ones), except when the text already
begins with the tokenizer's BOS string. Chat templates of tokenizers that add a BOS write it into the text
(`{{ bos_token }}`), and Hugging Face tokenizes templated text without adding specials; the exception keeps such
prompts at one BOS instead of two. A plain prompt (no chat template) of a base model therefore starts with BOS,
as in pre-training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether `text` is tokenized with the tokenizer's default special tokens (False when it starts with BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos != "" and text.startswith(bos))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """The token ids of one prompt, special tokens added as `adds_special_tokens` says."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text))["input_ids"])


def encode_prompts(tokenizer: Any, texts: list[str], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (len(texts), longest), left-padded with `pad_id` for generation."""
    rows = [encode_prompt(tokenizer, t) for t in texts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask
