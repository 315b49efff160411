"""What the memory plan (kpo_lightning/algorithms/memory_plan.py) reads from outside: a model's config.json, its
exact parameter counts (the model built on the meta device: no weights, no memory), and a device's free memory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from kpo_lightning.config import ModelConfig
from kpo_lightning.errors import UserInputError
from kpo_lightning.models.loading import apply_lora, resolve_model_path


def load_model_config(cfg: ModelConfig):
    """The transformers config of `model.name_or_path` (a folder's config.json, a built-in, or a hub name already in
    the local cache), or one line naming the path and the fix."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path)
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"model.name_or_path={cfg.name_or_path!r}: no config.json could be read ({str(e).splitlines()[0]}); "
            "--plan needs only the model's config.json: give a local folder holding it"
        ) from e


def parameter_counts(model_config, cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts (the fields of `algorithms.memory_plan.ParameterCounts`) of the policy that
    `load_model_and_tokenizer` builds (LoRA adapters included), from the model built on the meta device (tied
    weights counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of peft / transformers: not the user's concern here
        model = AutoModelForCausalLM.from_config(model_config)
        if cfg.lora.r > 0:
            model = apply_lora(model, cfg)
    classes = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    params = list(model.parameters())
    largest = max(layers, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    return dict(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        root=sum(p.numel() for p in params if id(p) not in in_layers),
        largest_layer=sum(p.numel() for p in largest.parameters()) if largest is not None else 0,
    )


def available_ram_bytes() -> int:
    """RAM the system can give without swapping: /proc/meminfo's MemAvailable, else free pages (os.sysconf)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can use now: CUDA's free memory plus what PyTorch's caching allocator
    holds unused; available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return available_ram_bytes()
