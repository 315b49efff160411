"""Speed of the causal Kalman filter (kpo_lightning.kalman, spec section 2) against torch.cumsum.

The filter runs at every forward of every optimizer step, so it should cost no more than a few
cumsums over the same tensor. Prints median wall times (ms) on a B x T float32 batch: the filter with
a right-padded mask (random lengths) and with random holes as well, one torch.cumsum, and a T-step
token loop (timed on the first tokens only, scaled linearly to T).

Each function is timed in its own block of calls (so a cheap call is not penalised by the cache and
allocator state a heavier neighbour leaves), and the blocks are repeated in rounds, so that all of
them see the same drift in machine load. The median and the minimum over all calls are reported.
Other processes on the machine distort multi-threaded timings badly (a thread that is descheduled
stalls every parallel op); the load average is printed for that reason. On a loaded machine the
minimum is the better estimate of the unloaded cost -- and a conservative one for the filter, whose
many ops are less likely than one cumsum to all run undisturbed.

    python benchmarks/filter_speed.py [--quick] [--batch 256] [--tokens 4096] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # time this checkout, not an installed copy
from kpo_lightning.kalman import causal_kalman_filter  # noqa: E402

Q, V = 1e-6, 1.0  # the paper's setting; the cost does not depend on it


def token_loop_filter(z: torch.Tensor, mask: torch.Tensor, q: float, v: float) -> torch.Tensor:
    """The obvious T-step loop, vectorised over the batch (what the chunked scan replaces)."""
    B, T = z.shape
    rho = torch.zeros(B, dtype=z.dtype)
    P = torch.zeros(B, dtype=z.dtype)
    out = torch.zeros_like(z)
    for t in range(T):
        m = mask[:, t]
        p_pred = P + q
        k = p_pred / (p_pred + v)
        rho = torch.where(m, rho + k * (z[:, t] - rho), rho)
        P = torch.where(m, (1 - k) * p_pred, P)
        out[:, t] = torch.where(m, rho, 0.0)
    return out


def call_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each function: `rounds` rounds of `calls` timed calls each."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(2):  # warm up caches and buffers after the previous block
                fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="fewer calls and a shorter token loop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, calls = (3, 5) if args.quick else (args.rounds, args.calls)
    B, T = args.batch, args.tokens

    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, generator=g) * 0.1
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    right_padded = torch.arange(T) < lengths[:, None]
    with_holes = right_padded & (torch.rand(B, T, generator=g) > 0.1)  # e.g. tool output mid-response

    fast = call_times(
        {
            "filter, right padding": lambda: causal_kalman_filter(z, right_padded, Q, V),
            "filter, holes (10% masked)": lambda: causal_kalman_filter(z, with_holes, Q, V),
            "torch.cumsum(dim=1)": lambda: torch.cumsum(z, dim=1),
        },
        rounds,
        calls,
    )
    loop_tokens = min(T, 128 if args.quick else 512)
    zl, ml = z[:, :loop_tokens].contiguous(), right_padded[:, :loop_tokens].contiguous()
    loop = statistics.median(call_times({"loop": lambda: token_loop_filter(zl, ml, Q, V)}, 1, 3)["loop"])
    loop *= T / loop_tokens

    med = {name: statistics.median(s) for name, s in fast.items()}
    low = {name: min(s) for name, s in fast.items()}
    cumsum = "torch.cumsum(dim=1)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"B={B} T={T} float32, torch threads={torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{rounds} rounds x {calls} calls")
    print(f"{'':40s} {'median ms':>10s} {'x cumsum':>9s} {'min ms':>9s} {'x cumsum':>9s}")
    for name in fast:
        print(
            f"{name:40s} {med[name] * 1e3:10.3f} {med[name] / med[cumsum]:9.2f}"
            f" {low[name] * 1e3:9.3f} {low[name] / low[cumsum]:9.2f}"
        )
    name = f"token loop ({loop_tokens} tokens, scaled x{T / loop_tokens:g})"
    print(f"{name:40s} {loop * 1e3:10.1f} {loop / med[cumsum]:9.1f}")
    print(
        f"token loop / filter (medians): {loop / med['filter, right padding']:.0f}x (right padding), "
        f"{loop / med['filter, holes (10% masked)']:.0f}x (holes)"
    )


if __name__ == "__main__":
    main()
