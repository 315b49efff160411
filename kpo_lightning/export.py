"""Export a policy (or a training checkpoint) as a Hugging Face folder for generation anywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def save_hf_folder(policy: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """`save_pretrained` of the policy (LoRA adapters merged into a copy) and tokenizer, loadable by
    `AutoModelForCausalLM.from_pretrained`."""
    path = Path(path)
    model = policy
    if hasattr(model, "merge_and_unload"):  # peft: write a plain model, not adapters
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_policy_weights(policy: torch.nn.Module, checkpoint_path: str | Path) -> torch.nn.Module:
    """Load a KPOModule checkpoint's policy weights (keys under `policy.`) into `policy`."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "policy."
    policy.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return policy
