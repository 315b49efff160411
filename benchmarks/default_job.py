"""The README results-table figures (docs/tasks.md): the embedded default job (`python run.py`) over several seeds.

For each seed, runs the default job in this process (`python run.py seed=S output_dir=...`, plus any extra
overrides) and reads its TensorBoard scalars: validation accuracy (avg@4 on 64 held-out problems) before training
and after the last step, the mean over rollout steps of the switch frequencies (raw, filtered) and, for KPO losses,
of `train/kalman_tau` and `train/filter_weight`, and the training time (the sum over rollout steps of generation +
scoring + update seconds; model loading, validation and start-up are not counted, the wall time of the whole run is
printed too).
Prints the machine line, one row per seed and min-median-max over the seeds.

    python benchmarks/default_job.py                    # seeds 0 1 2 (~3-4 min of CPU on 2 idle cores)
    python benchmarks/default_job.py --seeds 0 trainer.max_steps=20
    python benchmarks/default_job.py --threads 1      # on a busy machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from pathlib import Path

import torch
from machine import machine_line, spread  # benchmarks/machine.py (benchmarks/ is sys.path[0])
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kpo_lightning.cli.main import main as run_main

STEP_MEANS = ("train/switch_freq_raw", "train/switch_freq_filtered", "train/kalman_tau", "train/filter_weight")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="outputs/default_job")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's); 1 on a busy machine, where 2 threads stall each other",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_line(), flush=True)
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = run_main([f"seed={seed}", f"output_dir={out}", *args.overrides])
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"seed {seed} failed with exit code {code}: run python run.py seed={seed} to see why")
        s = scalars(out / "tensorboard")
        train_s = sum(
            v for tag in ("train/time_generate_s", "train/time_score_s", "train/time_update_s") for _, v in s[tag]
        )
        val = s["val/accuracy"]
        # mean over rollout steps; the filter's tau and weight only for KPO losses (NaN otherwise)
        per_step = {k: statistics.fmean(v for _, v in s[k]) if k in s else math.nan for k in STEP_MEANS}
        rows.append((seed, val[0][1], val[-1][1], val[-1][0], train_s, wall, per_step))
        print(
            f"seed {seed}: val accuracy {val[0][1]:.3f} (step {val[0][0]}) -> {val[-1][1]:.3f} (step {val[-1][0]}); "
            f"training {train_s:.1f} s, whole run {wall:.1f} s; mean over steps: "
            + ", ".join(f"{k} {v:.3g}" for k, v in per_step.items()),
            flush=True,
        )

    print(machine_line())
    print(f"over seeds {' '.join(str(r[0]) for r in rows)}, min-median-max:")
    print(f"  val accuracy before {spread([r[1] for r in rows], '.3f')}, after {spread([r[2] for r in rows], '.3f')}")
    for k in STEP_MEANS:
        print(f"  {k} (mean over steps) {spread([r[6][k] for r in rows], '.3g')}")
    print(
        f"  training seconds {spread([r[4] for r in rows], '.1f')}, "
        f"whole run seconds {spread([r[5] for r in rows], '.1f')}"
    )


if __name__ == "__main__":
    main()
