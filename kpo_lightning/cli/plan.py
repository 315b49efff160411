"""`python run.py ... --plan [--device-memory-gib N]`: the per-process memory budget of a run, from the model's
config.json alone (no weights, no GPU), printed line by line; exit 0 when it fits, else one line naming what to
change and exit 2. The arithmetic is kpo_lightning/algorithms/memory_plan.py.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from kpo_lightning.algorithms.memory_plan import GIB, HEADROOM, MemoryPlan, ParameterCounts, Shapes, plan_memory
from kpo_lightning.config import Config
from kpo_lightning.errors import UserInputError

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 2
MAX_PROCESSES = 64  # the largest FSDP process count a suggestion names


def process_count(cfg: Config) -> int:
    """Processes in all: `trainer.devices` (an int, a list "0,1", or auto: the CUDA devices here, else 1) times
    `trainer.num_nodes`."""
    spec = str(cfg.trainer.devices).strip()
    if "," in spec:
        per_node = len([d for d in spec.split(",") if d.strip()])
    elif spec in ("auto", "-1"):
        import torch

        per_node = torch.cuda.device_count() if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else 1
        per_node = max(per_node, 1)
    else:
        per_node = int(spec)
    return per_node * cfg.trainer.num_nodes


def device_memory_bytes(cfg: Config, device_memory_gib: float | None, processes: int) -> tuple[float, str]:
    """(bytes one process may use, where that number came from): `--device-memory-gib`, else the free memory of
    CUDA device 0, else (trainer.accelerator cpu, or auto without CUDA) the available RAM shared by the processes."""
    if device_memory_gib is not None:
        if not device_memory_gib > 0:
            raise UserInputError(
                f"--device-memory-gib={device_memory_gib} is invalid: give the GiB of one device (> 0)"
            )
        return device_memory_gib * GIB, "--device-memory-gib"
    import torch

    from kpo_lightning.models.memory import available_ram_bytes

    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return float(free), f"free memory of {torch.cuda.get_device_name(0)}"
    if cfg.trainer.accelerator == "gpu":
        raise UserInputError(
            "--plan: trainer.accelerator=gpu but this machine has no CUDA device; add --device-memory-gib N "
            "(the GiB of one GPU of the machine you plan for)"
        )
    return available_ram_bytes() / processes, f"available RAM / {processes} process(es)"


def _with(cfg: Config, **changes) -> Config:
    """A copy of `cfg` with dotted keys changed: _with(cfg, **{"optim.micro_batch_size": 2})."""
    out = cfg
    for key, value in changes.items():
        section, name = key.split(".", 1)
        if "." in name:  # model.lora.r
            inner, leaf = name.split(".")
            sub = getattr(out, section)
            value = dataclasses.replace(sub, **{inner: dataclasses.replace(getattr(sub, inner), **{leaf: value})})
            out = dataclasses.replace(out, **{section: value})
        else:
            out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{name: value})})
    return out


def suggest_changes(cfg: Config, processes: int, plan_for: Callable[[Config, int], MemoryPlan]) -> str:
    """What to change so the plan fits, as overrides: each lever that suffices alone (FSDP on the fewest processes,
    LoRA, the largest smaller micro-batch, gradient checkpointing), else the first combination that fits.
    `plan_for(cfg, processes)` plans a changed config."""
    nodes = cfg.trainer.num_nodes
    counts = [n for n in (2**i for i in range(7)) if n <= MAX_PROCESSES and n % nodes == 0]
    fsdp = [
        {"trainer.strategy": "fsdp", "trainer.devices": str(n // nodes)}
        for n in counts
        if n > processes or (n == processes and cfg.trainer.strategy != "fsdp")
    ]
    lora = [{"model.lora.r": 16}] if cfg.model.lora.r == 0 else []
    largest = cfg.optim.micro_batch_size or 64
    micro = [{"optim.micro_batch_size": m} for m in (largest // 2**i for i in range(1, 8)) if m >= 1]
    ckpt = {} if cfg.model.gradient_checkpointing else {"model.gradient_checkpointing": True}

    def fits(change: dict) -> bool:
        n = int(change["trainer.devices"]) * nodes if "trainer.devices" in change else processes
        return plan_for(_with(cfg, **change), n).fits

    found = [next((c for c in lever if fits(c)), None) for lever in (fsdp, lora, micro, [ckpt] if ckpt else [])]
    found = [c for c in found if c]
    combos = ({**ckpt, **f, **lo, **m} for lo in [{}, *lora] for f in fsdp or [{}] for m in [{}, *micro])
    found += [c for c in combos if c and c not in found and fits(c)][:1]  # on the fewest processes
    if not found:
        return (
            f"nothing up to {MAX_PROCESSES} FSDP processes with LoRA and micro-batch 1 fits: shorten "
            "rollout.max_new_tokens or data.max_prompt_tokens, or plan for a larger device"
        )
    return "change " + ", or ".join(" ".join(f"{k}={v}" for k, v in c.items()) for c in found)


def format_plan(plan: MemoryPlan, cfg: Config, source: str, counts: ParameterCounts) -> str:
    """The budget, one line per term, in GiB per process."""
    strategy = "FSDP over" if plan.sharded else "unsharded,"
    lines = [
        f"[kpo] memory plan per process ({strategy} {plan.processes} process(es), {cfg.trainer.precision}, "
        f"model {cfg.model.name_or_path}: {counts.total / 1e9:.3f}B parameters, {counts.trainable / 1e9:.3f}B "
        f"trainable); device {plan.device_bytes / GIB:.1f} GiB ({source}), {HEADROOM:.0%} kept free",
    ]
    for name, value in plan.lines.items():
        lines.append(f"  {name:<58} {value / GIB:9.2f} GiB")
    other = "without" if cfg.model.gradient_checkpointing else "with"
    lines.append(
        f"  {'(activations ' + other + ' checkpointing, for comparison)':<58} {plan.activations_other / GIB:9.2f} GiB"
    )
    batch = plan.generation_batch
    lines += [
        f"  {'generation peak (persistent + generation lines)':<58} {plan.generation_peak / GIB:9.2f} GiB",
        f"  {'training peak (persistent + training lines)':<58} {plan.training_peak / GIB:9.2f} GiB",
        f"  {'total (the larger peak) against usable device memory':<58} {plan.total / GIB:9.2f} GiB "
        f"of {plan.usable / GIB:.2f} GiB: {'fits' if plan.fits else 'does NOT fit'}",
        f"  generation batch: {batch or 'not even 1'} sequence(s) per generate "
        f"(rollout.generation_batch_size={cfg.rollout.generation_batch_size}; the largest call asks for "
        f"{plan.generation_sequences})",
    ]
    return "\n".join(lines)


def run_plan(cfg: Config, device_memory_gib: float | None) -> int:
    """Print the plan; 0 when it fits, else one line on stderr naming what to change and 2."""
    from kpo_lightning.models.memory import load_model_config, parameter_counts

    model_config = load_model_config(cfg.model)
    shapes = Shapes.from_config(model_config)
    processes = process_count(cfg)
    device_bytes, source = device_memory_bytes(cfg, device_memory_gib, processes)
    count_cache: dict[int, ParameterCounts] = {}

    def plan_for(c: Config, n: int) -> MemoryPlan:
        if c.model.lora.r not in count_cache:
            count_cache[c.model.lora.r] = ParameterCounts(**parameter_counts(model_config, c.model))
        return plan_memory(c, shapes, count_cache[c.model.lora.r], device_bytes, n)

    plan = plan_for(cfg, processes)
    print(format_plan(plan, cfg, source, count_cache[cfg.model.lora.r]), flush=True)
    if plan.fits:
        return EXIT_FITS
    need = plan.total / GIB if plan.generation_batch else plan.generation_peak / GIB
    fix = suggest_changes(cfg, processes, plan_for)
    print(
        f"error: --plan: does not fit {plan.usable / GIB:.1f} GiB usable per process (needs {need:.1f} GiB"
        f"{'' if plan.generation_batch else ' with one generated sequence'}); {fix}",
        file=sys.stderr,
    )
    return EXIT_DOES_NOT_FIT
