"""Speed of the causal Kalman filter (kpo_lightning.algorithms.kalman, spec section 2) against torch.cumsum.

The filter runs at every forward of every optimizer step, so it should cost no more than a few
cumsums over the same tensor. Prints median wall times (ms) on a B x T float32 batch: the filter with
a right-padded mask (random lengths) and with random holes as well, one torch.cumsum, and a T-step
token loop (timed on the first tokens only, scaled linearly to T).

Each function is timed in its own block of calls (so a cheap call is not penalised by the cache and
allocator state a heavier neighbour leaves), and the blocks are repeated in rounds, so that all of
them see the same drift in machine load; the median per call is one measurement. The whole
measurement is repeated (--repeats, default 5) and each row is reported as min-median-max over the
repetitions, its ratio to cumsum taken within the same repetition. Other processes on the machine
distort wall-time ratios badly (a thread that is descheduled stalls every parallel op, and a call
longer than a scheduler time slice waits for the other processes while a short cumsum often runs
undisturbed), so the machine line (CPU, cores, torch threads, load average) is printed with every
table, and the ratio is also given in process CPU time, which a loaded machine distorts much less:
at 1 thread it estimates the idle machine's wall-time ratio; at 2 threads it is the total CPU work
(including the threads' spin-waits), not the wall time.

    python benchmarks/filter_speed.py --threads 1 2      # the docs/benchmarks.md table (~1 min on 2 idle cores)
    python benchmarks/filter_speed.py [--quick] [--batch 256] [--tokens 4096] [--repeats 5] [--threads N ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # time this checkout, not an installed copy
from machine import machine_line, spread  # noqa: E402  (benchmarks/machine.py)

from kpo_lightning.algorithms.kalman import causal_kalman_filter  # noqa: E402

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


def call_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds per call of each function: `rounds` rounds of `calls` timed calls each."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(2):  # warm up caches and buffers after the previous block
                fn()
            for _ in range(calls):
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return samples


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


def measure(B: int, T: int, rounds: int, calls: int, quick: bool) -> tuple[dict[str, tuple[float, float]], str]:
    """One whole measurement: median (wall, CPU) seconds per call of each row (the token loop scaled to T), and
    the token loop's row name."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, generator=g) * 0.1
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    right_padded = torch.arange(T) < lengths[:, None]
    with_holes = right_padded & (torch.rand(B, T, generator=g) > 0.1)  # e.g. tool output mid-response

    fast = call_times(
        {
            PAD: lambda: causal_kalman_filter(z, right_padded, Q, V),
            HOLES: lambda: causal_kalman_filter(z, with_holes, Q, V),
            CUMSUM: lambda: torch.cumsum(z, dim=1),
        },
        rounds,
        calls,
    )
    loop_tokens = min(T, 128 if quick else 512)
    zl, ml = z[:, :loop_tokens].contiguous(), right_padded[:, :loop_tokens].contiguous()
    loop = medians(call_times({"loop": lambda: token_loop_filter(zl, ml, Q, V)}, 1, 3)["loop"])
    med = {name: medians(s) for name, s in fast.items()}
    med[LOOP] = (loop[0] * T / loop_tokens, loop[1] * T / loop_tokens)
    return med, f"token loop ({loop_tokens} tokens, scaled x{T / loop_tokens:g})"


PAD, HOLES, CUMSUM, LOOP = "filter, right padding", "filter, holes (10% masked)", "torch.cumsum(dim=1)", "loop"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="whole measurements per thread count (>= 3)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch thread counts to measure in turn, e.g. --threads 1 2 (default: torch's)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls and a shorter token loop")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    rounds, calls = (3, 5) if args.quick else (args.rounds, args.calls)
    B, T = args.batch, args.tokens
    default_threads = torch.get_num_threads()

    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        reps = []
        for _ in range(args.repeats):
            med, loop_name = measure(B, T, rounds, calls, args.quick)
            reps.append(med)
        print(machine_line())
        print(
            f"B={B} T={T} float32; {args.repeats} repetitions of the whole measurement ({rounds} rounds x "
            f"{calls} calls of each row, median per call); min-median-max over the repetitions"
        )
        print(f"{'':42s} {'median ms':>22s} {'x cumsum':>18s} {'x cumsum, CPU time':>20s}")
        for name in (PAD, HOLES, CUMSUM, LOOP):
            fmt = ".1f" if name == LOOP else ".2f"
            ms = spread([r[name][0] * 1e3 for r in reps], ".1f" if name == LOOP else ".3f")
            ratio = spread([r[name][0] / r[CUMSUM][0] for r in reps], fmt)
            cpu_ratio = spread([r[name][1] / r[CUMSUM][1] for r in reps], fmt)
            print(f"{loop_name if name == LOOP else name:42s} {ms:>22s} {ratio:>18s} {cpu_ratio:>20s}")
        print(
            f"token loop / filter: {spread([r[LOOP][0] / r[PAD][0] for r in reps], '.0f')}x (right padding), "
            f"{spread([r[LOOP][0] / r[HOLES][0] for r in reps], '.0f')}x (holes)\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
