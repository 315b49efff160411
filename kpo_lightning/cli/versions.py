"""What users paste into bug reports: this package's version, its main dependencies' versions and the device.

`run.py --version` prints `version_line()`; every training run starts with `startup_banner()` (one line).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import kpo_lightning


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of kpo-lightning, torch (with its build tag, e.g. +cpu), lightning, transformers and python."""
    import torch  # torch.__version__ carries the build (+cpu, +cu128) that the distribution metadata lacks

    return {
        "kpo-lightning": kpo_lightning.__version__,
        "torch": torch.__version__,
        "lightning": _dist_version("lightning"),
        "transformers": _dist_version("transformers"),
        "python": platform.python_version(),
    }


def version_line() -> str:
    """E.g. `kpo-lightning 0.1.0 (torch 2.13.0+cpu, lightning 2.6.0, transformers 5.2.0, python 3.11.7) from DIR`."""
    v = versions()
    deps = ", ".join(f"{k} {v[k]}" for k in ("torch", "lightning", "transformers", "python"))
    return f"kpo-lightning {v['kpo-lightning']} ({deps}) from {Path(kpo_lightning.__file__).parent}"


def device_description(trainer: Any) -> str:
    """E.g. `cpu x1 (2 threads)` or `cuda:0 (NVIDIA H200) x8, 2 nodes`, plus the precision."""
    import torch

    root = trainer.strategy.root_device
    name = f" ({torch.cuda.get_device_name(root)})" if root.type == "cuda" else ""
    threads = f" ({torch.get_num_threads()} threads)" if root.type == "cpu" else ""
    nodes = f", {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
    return f"{root}{name} x{trainer.num_devices}{threads}{nodes}, precision {trainer.precision}"


def startup_banner(trainer: Any, output_dir: Path) -> str:
    """One line: package, torch, lightning, transformers versions, device and the output folder."""
    v = versions()
    return (
        f"[kpo] kpo-lightning {v['kpo-lightning']} | torch {v['torch']} | lightning {v['lightning']} | "
        f"transformers {v['transformers']} | device {device_description(trainer)} | "
        f"output: {Path(output_dir).resolve()}"
    )
