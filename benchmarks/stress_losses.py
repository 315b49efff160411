"""GRPO, GSPO, GMPO, KPO and KPO-clipped in a stressed off-policy regime: a learning-rate sweep, several seeds.

Every run is `python run.py [preset=P] loss.type=L seed=S optim.lr=LR [loss.kalman_q=Q | loss.kalman_tau=TAU] ...`
in its own process
(OMP_NUM_THREADS=--threads, `--jobs` at a time), its TensorBoard folder under `--out`. Stress: `--minibatches`
mini-batches and `--epochs` epochs per rollout (all optimizer steps after the first of a rollout are off-policy).
Per cell (learning rate x loss [x Q]) over the seeds: validation accuracy (avg@k on the held-out split) before and
after, its change, training reward over the last quarter of steps, the number of collapsed runs, clip fractions and
skipped (non-finite) optimizer steps; with `--kalman-q` and/or `--kalman-tau`, KPO losses are run once per Q and once
per tau (V stays 1: only Q/V matters; tau sets Q/V = (tau / max_new_tokens)^2); without either they run at run.py's
default filter. A run has COLLAPSED when it stopped on non-finite losses/gradients (exit 1), or its final validation
accuracy is below `--collapse-ratio` x its accuracy before training. Writes a PNG of the reward curves, mean +- sd
over seeds. `--reuse` reads finished runs of the same command line instead of rerunning them.

    python benchmarks/stress_losses.py --preset chain --lrs 1e-4 3e-4 --seeds 0 1 2 3 4 --jobs 2
    python benchmarks/stress_losses.py --preset chain --losses kpo_clipped --kalman-q 1e-7 1e-6 1e-5 1e-4 --lrs 3e-4
    python benchmarks/stress_losses.py --preset chain --losses grpo kpo_clipped --kalman-q paper --kalman-tau 1 4 10
    python benchmarks/stress_losses.py --steps 4 --seeds 0 --losses grpo kpo   # a quick look (default task)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import machine_line, spread  # noqa: E402

LOSSES = ["grpo", "gspo", "gmpo", "kpo", "kpo_clipped"]
KPO_LOSSES = ("kpo", "kpo_clipped")
PAPER = "paper"  # --kalman-q paper: the loss's paper Q (kpo_clipped 1e-6, kpo 1e-4), set explicitly
DEFAULT = "default"  # --kalman-tau default: neither key set, run.py's default filter
FILTER_KEYS = {"q": "loss.kalman_q", "tau": "loss.kalman_tau"}
Filter = tuple[str, float] | None  # ("q", Q) or ("tau", tau); None: the loss's own default (not set)


@dataclass
class Run:
    lr: float
    loss: str
    kalman: Filter
    seed: int
    out: Path
    cmd: list[str] = field(default_factory=list)
    rc: int | None = None
    seconds: float = float("nan")
    scalars: dict = field(default_factory=dict)
    reused: bool = False

    @property
    def cell(self) -> tuple:
        return (self.lr, self.loss, self.kalman)


def cell_name(lr: float, loss: str, kalman: Filter) -> str:
    """'kpo_clipped Q=1e-06', 'kpo tau=4', 'grpo' (the table's loss column, and what --reference names)."""
    if kalman is None:
        return loss
    return f"{loss} {'Q' if kalman[0] == 'q' else 'tau'}={kalman[1]:g}"


def filter_settings(loss: str, kalman_q: list | None, kalman_tau: list | None) -> list[Filter]:
    """The filters a loss is run with: one per --kalman-q and per --kalman-tau value for a KPO loss, else [None]."""
    if loss not in KPO_LOSSES or not (kalman_q or kalman_tau):
        return [None]
    from kpo_lightning.algorithms.losses import LOSS_DEFAULTS

    out: list[Filter] = [("q", LOSS_DEFAULTS[loss]["kalman_q"] if q == PAPER else q) for q in kalman_q or []]
    return out + [None if tau == DEFAULT else ("tau", tau) for tau in kalman_tau or []]


def build_runs(args) -> list[Run]:
    runs = []
    for lr in args.lrs:
        for loss in args.losses:
            for kalman in filter_settings(loss, args.kalman_q, args.kalman_tau):
                for seed in args.seeds:
                    tag = f"lr{lr:g}-{loss}" + (f"-{kalman[0]}{kalman[1]:g}" if kalman else "") + f"-seed{seed}"
                    out = Path(args.out) / tag
                    cmd = [sys.executable, str(ROOT / "run.py")] + ([f"preset={args.preset}"] if args.preset else [])
                    cmd += [
                        f"loss.type={loss}",
                        f"seed={seed}",
                        f"optim.lr={lr}",
                        f"output_dir={out}",
                        "log.samples_every_n_steps=0",
                        "log.ratio_plot_every_n_steps=0",
                        "checkpoint.every_n_steps=0",
                    ]
                    if kalman is not None:
                        cmd.append(f"{FILTER_KEYS[kalman[0]]}={kalman[1]}")
                    for key, value in (
                        ("trainer.max_steps", args.steps),
                        ("optim.num_minibatches", args.minibatches),
                        ("optim.epochs_per_rollout", args.epochs),
                    ):
                        if value is not None:
                            cmd.append(f"{key}={value}")
                    cmd.append(f"eval.every_n_steps={args.eval_every or args.steps or 10**6}")  # before and at the end
                    cmd += args.overrides
                    runs.append(Run(lr, loss, kalman, seed, out, cmd))
    return runs


def launch(runs: list[Run], jobs: int, threads: int, reuse: bool) -> int:
    """Run the commands, `jobs` at a time; each writes done.json (exit code, seconds, command) when it ends."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    pending = []
    for run in runs:
        done = run.out / "done.json"
        if reuse and done.exists():
            info = json.loads(done.read_text())
            if info["cmd"][1:] == run.cmd[1:]:
                run.rc, run.seconds = info["rc"], info["seconds"]
                run.reused = True
                continue
        pending.append(run)
    active: list[tuple[Run, subprocess.Popen, float, object]] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            if run.out.exists():
                shutil.rmtree(run.out)  # TensorBoard appends: a stale folder would mix two runs' points
            run.out.mkdir(parents=True)
            log = open(run.out / "run.log", "w")  # noqa: SIM115 (open while the run lasts; closed when it ends)
            active.append(
                (
                    run,
                    subprocess.Popen(run.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                    time.perf_counter(),
                    log,
                )
            )
        time.sleep(0.2)
        for item in list(active):
            run, proc, t0, log = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            run.rc, run.seconds = proc.returncode, time.perf_counter() - t0
            (run.out / "done.json").write_text(json.dumps({"rc": run.rc, "seconds": run.seconds, "cmd": run.cmd}))
            status = "ok" if run.rc == 0 else ("stopped: non-finite" if run.rc == 1 else f"FAILED rc={run.rc}")
            print(f"  {run.out.name}: {run.seconds:.0f} s, {status}", flush=True)
            if run.rc not in (0, 1):
                tail = (run.out / "run.log").read_text()[-2000:]
                raise SystemExit(f"run {run.out} failed (exit {run.rc}):\n{tail}")


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.exists():
        return {}
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def sd(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t of mean(a) - mean(b); |t| below ~2.3 (5 vs 5 seeds) is within seed noise at the 5% level."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    diff = statistics.fmean(a) - statistics.fmean(b)
    return diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))


def summarize(run: Run, collapse_ratio: float) -> dict:
    s = run.scalars
    val = s.get("val/accuracy", [])
    before = val[0][1] if val and val[0][0] == 0 else float("nan")
    after = val[-1][1] if run.rc == 0 and len(val) > 1 else float("nan")
    reward = [v for _, v in s.get("train/reward", [])]
    tail = reward[-max(1, len(reward) // 4) :] if reward else []
    finite_after = not math.isnan(after)
    collapsed = run.rc == 1 or not finite_after or after < collapse_ratio * before
    return {
        "before": before,
        "after": after,
        "delta": after - before,
        "reward_tail": mean(tail),
        "collapsed": collapsed,
        "nonfinite_stop": run.rc == 1,
        "clip_low": mean([v for _, v in s.get("train/clip_frac_low", [])]),
        "clip_high": mean([v for _, v in s.get("train/clip_frac_high", [])]),
        "skipped": s.get("train/skipped_steps", [(0, 0.0)])[-1][1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="run.py preset (e.g. chain); default: the embedded default task")
    p.add_argument("--losses", nargs="+", default=LOSSES)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4])
    p.add_argument(
        "--kalman-q",
        type=lambda x: PAPER if x == PAPER else float(x),
        nargs="+",
        default=None,
        help="Q values for the KPO losses (V=1); 'paper' = the loss's paper Q (kpo_clipped 1e-6, kpo 1e-4)",
    )
    p.add_argument(
        "--kalman-tau",
        type=lambda x: DEFAULT if x == DEFAULT else float(x),
        nargs="+",
        default=None,
        help="tau values for the KPO losses (Q/V = (tau / max_new_tokens)^2); 'default' = run.py's default filter",
    )
    p.add_argument(
        "--reference",
        default="grpo",
        help="the cell the t column compares with, at the same learning rate (e.g. 'kpo_clipped')",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=None, help="rollout steps (default: the preset's)")
    p.add_argument("--minibatches", type=int, default=8, help="mini-batches per rollout (default 8)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per rollout (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: before and end)")
    p.add_argument(
        "--collapse-ratio",
        type=float,
        default=0.5,
        help="collapsed: final val acc below this x val acc before (or a non-finite stop)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--out", default="outputs/stress_losses")
    p.add_argument("--plot", default="benchmarks/stress_losses.png")
    p.add_argument("--reuse", action="store_true", help="read finished runs with the same command instead of rerunning")
    p.add_argument("overrides", nargs="*", help="extra run.py key=value overrides for every run")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # so the machine line states the runs' thread count
    print(machine_line(), flush=True)
    runs = build_runs(args)
    print(
        f"{len(runs)} runs, {args.jobs} at a time, OMP_NUM_THREADS={args.threads}; e.g. {' '.join(runs[0].cmd[1:])}",
        flush=True,
    )
    start = time.perf_counter()
    launch(runs, args.jobs, args.threads, args.reuse)
    minutes = (time.perf_counter() - start) / 60
    for run in runs:
        run.scalars = read_scalars(run.out / "tensorboard")

    cells: dict[tuple, list[Run]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    stats = {c: [summarize(r, args.collapse_ratio) for r in rs] for c, rs in cells.items()}
    steps = max((len(r.scalars.get("train/reward", [])) for r in runs), default=0)
    reused = sum(r.reused for r in runs)
    print(
        f"\n{len(runs) - reused} runs took {minutes:.1f} min ({args.jobs} at a time)"
        f"{f', {reused} more read from earlier runs (--reuse)' if reused else ''}; per run "
        f"{spread([r.seconds for r in runs], '.0f')} s wall; {steps} rollout steps, {args.minibatches} mini-batches"
        f"{f' x {args.epochs} epochs' if args.epochs else ''} per rollout; seeds {' '.join(map(str, args.seeds))}"
        f"{'; ' + ' '.join(args.overrides) if args.overrides else ''}"
    )
    print(machine_line())
    print(
        f"collapsed = non-finite stop, or final val acc < {args.collapse_ratio:g} x val acc before. t = Welch's t of "
        f"the change in val acc against {args.reference} at the same learning rate (|t| < ~2.3: within seed noise "
        "at 5% for 5 vs 5 seeds)\n"
    )
    header = (
        f"| lr | loss | val acc before | val acc after: mean +- sd (min-median-max) | change | t vs {args.reference} | "
        "reward, last quarter | collapsed | clip frac low / high | skipped steps |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for (lr, loss, kalman), st in stats.items():
        after = [x["after"] for x in st]
        finite = [a for a in after if not math.isnan(a)]
        delta = [x["delta"] for x in st if not math.isnan(x["delta"])]
        ref_cell = next((c for c in stats if c[0] == lr and cell_name(*c) == args.reference), None)
        ref = [x["delta"] for x in stats.get(ref_cell, []) if not math.isnan(x["delta"])]
        t = welch_t(delta, ref) if ref_cell is not None and ref_cell != (lr, loss, kalman) else float("nan")
        n_nonfinite = sum(x["nonfinite_stop"] for x in st)
        print(
            f"| {lr:g} | {cell_name(lr, loss, kalman)} | {mean([x['before'] for x in st]):.3f} | "
            f"{mean(finite):.3f} +- {sd(finite):.3f} ({spread(finite, '.3f') if finite else '-'}) | "
            f"{mean(delta):+.3f} +- {sd(delta):.3f} | {'' if math.isnan(t) else f'{t:+.1f}'} | "
            f"{mean([x['reward_tail'] for x in st]):.3f} +- {sd([x['reward_tail'] for x in st]):.3f} | "
            f"{sum(x['collapsed'] for x in st)}/{len(st)}{f' ({n_nonfinite} non-finite)' if n_nonfinite else ''} | "
            f"{mean([x['clip_low'] for x in st]):.4f} / {mean([x['clip_high'] for x in st]):.4f} | "
            f"{mean([x['skipped'] for x in st]):.1f} |"
        )
    plot(args, cells)
    print(f"\nplot: {args.plot}; runs (TensorBoard, config, log): {args.out}/")


def plot(args, cells: dict[tuple, list[Run]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lrs = list(dict.fromkeys(lr for lr, _, _ in cells))
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 3.8), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for (cell_lr, loss, kalman), rs in cells.items():
            if cell_lr != lr:
                continue
            curves = [[v for _, v in r.scalars.get("train/reward", [])] for r in rs]
            n = max((len(c) for c in curves), default=0)
            if n == 0:
                continue
            arr = np.full((len(curves), n), np.nan)
            for i, c in enumerate(curves):
                smooth = [float(np.mean(c[max(0, j - 4) : j + 1])) for j in range(len(c))]  # 5-step average
                arr[i, : len(c)] = smooth
            m, s = np.nanmean(arr, 0), np.nanstd(arr, 0, ddof=1) if len(curves) > 1 else np.zeros(n)
            x = np.arange(1, n + 1)
            (line,) = ax.plot(x, m, label=cell_name(lr, loss, kalman), lw=1.2)
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15)
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training reward (5-step avg; mean +- sd over seeds)")
    axes[0][-1].legend(fontsize=7)
    n_seeds = len(next(iter(cells.values())))
    fig.suptitle(
        f"{args.preset or 'default task'}, {args.minibatches} mini-batches"
        f"{f' x {args.epochs} epochs' if args.epochs else ''} per rollout, {n_seeds} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.plot, dpi=90)


if __name__ == "__main__":
    main()
