"""GRPO, GSPO, GMPO, KPO and KPO-clipped on the built-in arithmetic task, several seeds, stressed off-policy.

Every run is `python run.py` with the same embedded default (the shipped tiny-arith model, same prompts per seed)
except `loss.type`, and with more mini-batches per rollout than the paper (`--minibatches`, default 8: seven of
eight optimizer steps are off-policy), so the ratios drift further from 1. Prints a table of final validation
accuracy (avg@k), its spread across seeds, the mean training reward over the last steps and its variance across
seeds, ratio variance and switch frequency raw vs filtered, and writes a PNG of the reward curves.

    python benchmarks/compare_losses.py                       # ~15-20 min on 2 CPU cores
    python benchmarks/compare_losses.py --seeds 0 --steps 10  # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from machine import machine_line, spread  # noqa: E402  (benchmarks/machine.py; benchmarks/ is sys.path[0])
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from kpo_lightning.cli.main import main as run_main  # noqa: E402

LOSSES = ["grpo", "gspo", "gmpo", "kpo", "kpo_clipped"]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def run(loss: str, seed: int, args) -> dict[str, list[tuple[int, float]]]:
    out = Path(args.out) / f"{loss}-seed{seed}"
    overrides = [
        f"loss.type={loss}",
        f"seed={seed}",
        f"output_dir={out}",
        f"trainer.max_steps={args.steps}",
        f"optim.num_minibatches={args.minibatches}",
        f"eval.every_n_steps={args.steps}",
        "log.samples_every_n_steps=0",
        "log.ratio_plot_every_n_steps=0",
        "checkpoint.every_n_steps=0",
    ]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run_main(overrides)
    if code != 0:
        raise SystemExit(f"run {loss} seed {seed} failed with exit code {code}")
    return scalars(out / "tensorboard")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--minibatches", type=int, default=8)
    p.add_argument("--losses", nargs="+", default=LOSSES)
    p.add_argument("--out", default="outputs/compare_losses")
    p.add_argument("--plot", default="benchmarks/compare_losses.png")
    args = p.parse_args()

    print(machine_line(), flush=True)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for loss in args.losses:
        for seed in args.seeds:
            print(f"running {loss} seed {seed} ...", flush=True)
            results.setdefault(loss, []).append(run(loss, seed, args))

    tail = max(1, args.steps // 4)
    header = (
        "| loss | val acc before | val acc after (mean +- sd over seeds; min-median-max) | "
        "reward, last quarter | reward var across seeds | ratio var raw | ratio var filtered | switch freq raw | "
        "switch freq filtered |"
    )
    print(
        f"\n{len(args.seeds)} seeds, {args.steps} rollout steps, {args.minibatches} mini-batches per rollout; "
        f"{len(args.losses) * len(args.seeds)} runs took {(time.perf_counter() - start) / 60:.1f} min"
    )
    print(machine_line() + "\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for loss, runs in results.items():
        before = [r["val/accuracy"][0][1] for r in runs]
        after = [r["val/accuracy"][-1][1] for r in runs]
        last_reward = [mean([v for _, v in r["train/reward"][-tail:]]) for r in runs]
        diag = {
            k: mean([mean([v for _, v in r[k]]) for r in runs if k in r])
            for k in (
                "train/ratio_var_raw",
                "train/ratio_var_filtered",
                "train/switch_freq_raw",
                "train/switch_freq_filtered",
            )
        }
        sd = statistics.stdev(after) if len(after) > 1 else 0.0
        var = statistics.variance(last_reward) if len(last_reward) > 1 else 0.0
        print(
            f"| {loss} | {mean(before):.3f} | {mean(after):.3f} +- {sd:.3f}; {spread(after, '.3f')} | "
            f"{mean(last_reward):.3f} | {var:.5f} | "
            f"{diag['train/ratio_var_raw']:.2e} | {diag['train/ratio_var_filtered']:.2e} | "
            f"{diag['train/switch_freq_raw']:.3f} | {diag['train/switch_freq_filtered']:.3f} |"
        )

    fig, ax = plt.subplots(figsize=(7, 4))
    for loss, runs in results.items():
        steps = [s for s, _ in runs[0]["train/reward"]]
        curve = [mean([r["train/reward"][i][1] for r in runs]) for i in range(len(steps))]
        smooth = [mean(curve[max(0, i - 4) : i + 1]) for i in range(len(curve))]
        ax.plot(steps, smooth, label=loss)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(f"training reward (mean of {len(args.seeds)} seeds, 5-step average)")
    ax.set_title(f"arithmetic task, {args.minibatches} mini-batches per rollout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
