"""The machine line and the spread that every benchmark prints, so a figure can be compared with a rerun.

from machine import machine_line, spread   # benchmarks/ is sys.path[0] when a script there runs
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (with family/model, the vector extensions and the hypervisor, which
    a virtual machine's generic model name hides), else platform.processor()."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    first: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    ext = [name for name, flag in (("avx2", "avx2"), ("avx512", "avx512f"), ("amx", "amx_tile")) if flag in flags]
    vm = ", virtual machine" if "hypervisor" in flags else ""
    return (
        f"{first.get('model name', platform.processor())} (family {first.get('cpu family', '?')} model "
        f"{first.get('model', '?')}, {' '.join(ext) or 'no avx2'}{vm})"
    )


def machine_line() -> str:
    """E.g. `machine: Intel(R) Xeon(R) Processor (...), 2 CPUs (2 usable), torch 2.13.0+cpu at 2 threads, python
    3.11.7, load average 0.10 0.20 0.30`. Call it after torch.set_num_threads."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({usable} usable){gpu}, torch {torch.__version__} at "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}, load average {load}"
    )


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """`min-median-max` of repeated measurements, e.g. `2.41-2.63-3.02`."""
    return "-".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
