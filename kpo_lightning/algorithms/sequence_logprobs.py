"""Per-token log-probs of the response part of sequences under a causal LM, without a full-vocabulary copy.

Position t of the model's output predicts token t + 1, so the response tokens input_ids[:, P:] (P = prompt
length) are scored by the logits at positions P-1 .. T-2. The model is asked for exactly those positions:
transformers' causal LMs take `logits_to_keep` as a 1-D tensor of positions and slice the hidden states before
the LM head, so the head computes contiguous (B, R, V) logits, its backward runs on those R positions only, and
the only (B, T, .) gradient is that of the (small) hidden states. `kpo_lightning.algorithms.logprobs` then reads
the logits in place and writes their gradient over them (`in_place_backward`), so the step's one full-vocabulary
tensor is the logits, living from the head's forward to its backward.

The former route (`logits_to_keep=R + 1`, then `logits[:, :-1]`) made three more (B, R, V)-sized tensors: the
copy that flattening the non-contiguous slice makes (kept alive for backward in place of the logits), and in
backward the gradient plus the slice's zero-padded (B, R + 1, V) copy of it, so two full-vocabulary tensors were
alive at its peak (forward and backward) against one now. benchmarks/logprob_memory.py measures the routes.

Models whose forward does not take `logits_to_keep` (or ignores it) return all T positions; the window is then
scored in place with `start=P-1`, and the gradient overwrites the (B, T, V) logits, zero outside the window.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from kpo_lightning.algorithms.logprobs import token_logprobs, token_logprobs_and_entropy


def _innermost(model: nn.Module) -> nn.Module:
    """The model under known wrappers: peft (get_base_model), torch.compile (_orig_mod), DDP/FSDP1 (.module)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward has a `logits_to_keep` parameter (transformers causal LMs do)."""
    try:
        params = inspect.signature(_innermost(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(log-probs, entropy or None) of the response tokens input_ids[:, prompt_length:], each (B, R) float32,
    under softmax(logits / temperature) of `model`.

    Position ids follow the attention mask, as in generation, so left padding does not shift positions.
    Needs prompt_length >= 1 (the first token has no prediction).
    """
    total = input_ids.shape[1]
    if not 1 <= prompt_length <= total:
        raise ValueError(f"prompt_length must be in [1, {total}] (sequence length), got {prompt_length}")
    response_len = total - prompt_length
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(prompt_length - 1, total - 1, device=input_ids.device)
    logits = model(**kwargs).logits
    if logits.shape[1] == response_len:
        start = 0  # exactly the scoring positions
    elif logits.shape[1] == total:
        start = prompt_length - 1  # all positions: score the window in place
    else:
        raise ValueError(
            f"model returned logits for {logits.shape[1]} positions; expected {response_len} "
            f"(logits_to_keep) or {total} (all)"
        )
    tokens = input_ids[:, prompt_length:]
    # The logits are private to this call (nothing else reads them after backward): their gradient overwrites them.
    opts = dict(temperature=temperature, start=start, in_place_backward=True)
    if with_entropy:
        return token_logprobs_and_entropy(logits, tokens, **opts)
    return token_logprobs(logits, tokens, **opts), None
