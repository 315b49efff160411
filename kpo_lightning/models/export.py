"""Export a policy (or a training checkpoint) as a Hugging Face folder for generation anywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def save_hf_folder(
    policy: torch.nn.Module, tokenizer, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """`save_pretrained` of the policy (LoRA adapters merged into a copy) and tokenizer, loadable by
    `AutoModelForCausalLM.from_pretrained`.

    `state_dict`: the policy's full weights when `policy` itself is sharded (`sharding.full_state_dict`, gathered
    by every process); they are written through an unsharded model of the same architecture.
    """
    path = Path(path)
    model = policy if state_dict is None else _plain_model(policy, state_dict)
    if hasattr(model, "merge_and_unload"):  # peft: write a plain model, not adapters
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_policy_weights(policy: torch.nn.Module, checkpoint_path: str | Path) -> torch.nn.Module:
    """Load a KPOModule checkpoint's policy weights (keys under `policy.`) into `policy`."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "policy."
    policy.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return policy


def _plain_model(policy: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model with `policy`'s architecture (and LoRA adapters) holding `state_dict`, built without
    initialising weights (the meta device, then empty CPU storage the state dict fills)."""
    from transformers import AutoModelForCausalLM

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    dtype = next(v.dtype for v in state_dict.values() if v.is_floating_point())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    model.to_empty(device="cpu")
    if hasattr(policy, "peft_config"):
        from peft import get_peft_model

        model = get_peft_model(model, policy.peft_config[policy.active_adapter])
    model.load_state_dict(state_dict)
    model.generation_config = base.generation_config
    return model
