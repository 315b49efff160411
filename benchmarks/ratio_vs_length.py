"""Switch frequency and ratio variance, raw vs Kalman-filtered, against response length, from real training runs.

Each seed is one real training run (`python run.py` with the given preset and overrides, built here with the
library's public pieces) whose module records, for every row of every off-policy micro-batch, its valid length,
its switch fraction raw and filtered (the filter the loss uses: its Q, V, P0) and its ratio sums. Rows are
binned by length; per bin and seed: mean switch fraction over rows (spec section 6) and the variance of the ratio
over all the bin's valid tokens. A log-log fit of filtered switch frequency against length, per seed, gives the
slope (mean +- sd across seeds) and its extrapolation to 4096 tokens, to compare with the paper's ~0.01. A
SYNTHETIC check then draws 4096-token raw log-ratio sequences as a Gaussian AR(1) with the measured raw mean,
variance and lag-1 autocorrelation, filters them with the same Q/V/P0 and reports their switch frequency (and the
same synthetic model at the measured lengths, to show how well it reproduces the real bins). Writes a PNG.

    python benchmarks/ratio_vs_length.py --preset chain --seeds 0 1 2 --jobs 2   # 3 runs, 2 at a time
    python benchmarks/ratio_vs_length.py --steps 4 --seeds 0                     # a quick look (default task)
    python benchmarks/ratio_vs_length.py --preset chain --kalman-tau 4 --also-tau 1 10   # train at tau 4

`--kalman-q Q` / `--kalman-tau TAU` set the training filter (loss.kalman_q / loss.kalman_tau, Q/V = (TAU / L)^2 with
L = rollout.max_new_tokens); `--also-qv` / `--also-tau` add columns of the same raw rows filtered post hoc at other
Q/V or tau (tau converted at the run's max_new_tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also in spawned worker processes
from machine import machine_line, spread  # noqa: E402

PAPER_RAW, PAPER_FILTERED, PAPER_LENGTH = 0.43, 0.01, 4096


def train_and_record(preset: str | None, seed: int, steps: int | None, overrides: list[str], threads: int) -> dict:
    """One real training run; returns per-row records of its off-policy micro-batches and the filter it used."""
    import lightning.pytorch as pl
    import torch

    from kpo_lightning import KPOModule, PromptDataModule, RolloutCallback, load_model_and_tokenizer
    from kpo_lightning.algorithms.metrics import switch_fractions
    from kpo_lightning.cli.config_checks import check_config
    from kpo_lightning.cli.config_loading import load_config
    from kpo_lightning.cli.main import check_inputs
    from kpo_lightning.cli.train import build_trainer

    torch.set_num_threads(threads)

    class RecordingModule(KPOModule):
        """KPOModule that keeps per-row ratio statistics of every off-policy micro-batch it trains on."""

        records: list[dict]

        def _update_ratio_metrics(self, raw_log_ratio, mask):
            raw, filtered, m = super()._update_ratio_metrics(raw_log_ratio, mask)
            m = m.bool()
            sw_raw, ok = switch_fractions(raw, m)
            sw_filt, _ = switch_fractions(filtered, m)
            d_raw = torch.where(m, torch.expm1(raw.double().clamp(-20, 20)), 0.0)
            d_filt = torch.where(m, torch.expm1(filtered.double().clamp(-20, 20)), 0.0)
            for i in range(m.shape[0]):
                n = int(m[i].sum())
                if n == 0:
                    continue
                self.records.append(
                    {
                        "step": self.rollout_step,
                        "length": n,
                        "has_pairs": bool(ok[i]),
                        "sw_raw": float(sw_raw[i]),
                        "sw_filt": float(sw_filt[i]),
                        "d_raw": (float(d_raw[i].sum()), float(d_raw[i].square().sum())),
                        "d_filt": (float(d_filt[i].sum()), float(d_filt[i].square().sum())),
                        "z": raw[i][m[i]]
                        .double()
                        .numpy()
                        .astype(np.float32),  # raw log-ratios, for the synthetic model
                    }
                )
            return raw, filtered, m

    args = ([f"preset={preset}"] if preset else []) + [
        f"seed={seed}",
        "eval.every_n_steps=0",
        "log.samples_every_n_steps=0",
        "log.ratio_plot_every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "output_dir=outputs/ratio_vs_length",
    ]
    if steps is not None:
        args.append(f"trainer.max_steps={steps}")
    cfg = load_config(args + list(overrides))
    check_config(cfg)
    reward_fn = check_inputs(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model, precision=cfg.trainer.precision)
    data = PromptDataModule(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    module = RecordingModule.from_config(model, tokenizer, cfg, reward_fn)
    module.records = []
    trainer = build_trainer(cfg, [RolloutCallback()], logger=False)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, datamodule=data)  # quiet: progress bar and Lightning's notes
    return {
        "seed": seed,
        "records": module.records,
        "kalman": dict(module.diag_kalman),
        "loss": cfg.loss.type,
        "steps": cfg.trainer.max_steps,
        "minibatches": cfg.optim.num_minibatches,
        "epochs": cfg.optim.epochs_per_rollout,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "seconds": time.perf_counter() - start,
    }


def filter_overrides(kalman_q: float | None, kalman_tau: float | None) -> list[str]:
    """The run.py overrides of --kalman-q / --kalman-tau (at most one is given; none: the run's default filter)."""
    return [f"{key}={value}" for key, value in (("loss.kalman_q", kalman_q), ("loss.kalman_tau", kalman_tau)) if value]


def post_hoc_filters(also_qv: list[float], also_tau: list[float], max_new_tokens: int) -> list[tuple[str, str, float]]:
    """(record key, column label, Q/V) of each post-hoc filter: --also-qv as given, --also-tau at Q/V = (tau / L)^2
    with L = the runs' max_new_tokens."""
    from kpo_lightning.algorithms.kalman import qv_from_tau

    out = [(f"sw_qv{qv:g}", f"Q/V={qv:g}", qv) for qv in also_qv]
    for tau in also_tau:
        qv = qv_from_tau(tau, max_new_tokens)
        out.append((f"sw_tau{tau:g}", f"tau={tau:g} (Q/V={qv:.3g})", qv))
    return out


def refilter(records: list[dict], q: float, v: float, p0: float) -> list[float]:
    """Switch fraction of each recorded row's raw log-ratios filtered again with another Q, V, P0 (post hoc: the
    run trained with its own filter; this shows what a different Q/V makes of the same raw rows)."""
    import torch

    from kpo_lightning import causal_kalman_filter
    from kpo_lightning.algorithms.metrics import switch_fractions

    width = max(len(r["z"]) for r in records)
    z = torch.zeros(len(records), width, dtype=torch.float64)
    mask = torch.zeros(len(records), width, dtype=torch.bool)
    for i, r in enumerate(records):
        z[i, : len(r["z"])] = torch.from_numpy(r["z"].astype(np.float64))
        mask[i, : len(r["z"])] = True
    return switch_fractions(causal_kalman_filter(z, mask, q, v, p0), mask)[0].tolist()


def bin_stats(records: list[dict], edges: list[float], extra: tuple[str, ...] = ()) -> list[dict]:
    """Per length bin [lo, hi): rows, mean length, mean switch fraction raw/filtered (rows with >= 2 tokens), and
    the ratio variance raw/filtered over all the bin's valid tokens."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        rows = [r for r in records if lo <= r["length"] < hi]
        pairs = [r for r in rows if r["has_pairs"]]
        if not pairs:
            out.append({"lo": lo, "hi": hi, "rows": 0})
            continue
        stats = {
            "lo": lo,
            "hi": hi,
            "rows": len(rows),
            "length": statistics.fmean(r["length"] for r in rows),
            "sw_raw": statistics.fmean(r["sw_raw"] for r in pairs),
            "sw_filt": statistics.fmean(r["sw_filt"] for r in pairs),
        }
        stats.update({key: statistics.fmean(r[key] for r in pairs) for key in extra})
        n = sum(r["length"] for r in rows)
        for key in ("raw", "filt"):
            s = sum(r[f"d_{key}"][0] for r in rows)
            s2 = sum(r[f"d_{key}"][1] for r in rows)
            stats[f"var_{key}"] = max(s2 / n - (s / n) ** 2, 0.0)
        out.append(stats)
    return out


def loglog_fit(bins: list[dict], key: str, min_rows: int) -> tuple[float, float] | None:
    """Least-squares slope and intercept of log(key) against log(length) over bins with enough rows and key > 0."""
    pts = [(math.log(b["length"]), math.log(b[key])) for b in bins if b["rows"] >= min_rows and b.get(key, 0) > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def raw_statistics(records: list[dict]) -> dict:
    """Pooled mean, variance and lag-1 autocorrelation of the raw log-ratio within rows (all rows, all tokens)."""
    z = [r["z"].astype(np.float64) for r in records]
    allz = np.concatenate(z)
    mean, var = float(allz.mean()), float(allz.var())
    num = sum(float(((zi[1:] - mean) * (zi[:-1] - mean)).sum()) for zi in z if len(zi) > 1)
    den = sum(float(((zi[1:] - mean) ** 2).sum()) for zi in z if len(zi) > 1)
    return {"mean": mean, "var": var, "lag1": num / den if den > 0 else 0.0, "tokens": allz.size}


SYNTHETIC_KINDS = {
    "ar1": "Gaussian AR(1), zero mean",
    "ar1_mean": "Gaussian AR(1), measured mean",
    "resampled": "tokens resampled iid from the measured raw log-ratios",
}


def synthetic_switch(
    stats: dict, kalman: dict, length: int, rows: int, seed: int, kind: str, pool: np.ndarray | None = None
) -> tuple[float, float]:
    """SYNTHETIC: switch frequency raw and filtered of `rows` made-up log-ratio rows of `length` tokens, filtered
    with the given Q, V, P0. `kind`: "ar1" (Gaussian AR(1) with the measured variance and lag-1 autocorrelation),
    "ar1_mean" (the same plus the measured mean), "resampled" (tokens drawn iid from `pool`, the measured raw
    log-ratios: the measured distribution's shape, heavy tails included, without its autocorrelation)."""
    import torch

    from kpo_lightning import causal_kalman_filter
    from kpo_lightning.algorithms.metrics import switch_fractions

    g = torch.Generator().manual_seed(seed)
    if kind == "resampled":
        pool_t = torch.from_numpy(np.asarray(pool, dtype=np.float64))
        z = pool_t[torch.randint(len(pool_t), (rows, length), generator=g)]
    else:
        phi, sd = stats["lag1"], math.sqrt(stats["var"])
        eps = torch.randn(rows, length, generator=g, dtype=torch.float64) * sd * math.sqrt(max(1 - phi * phi, 0.0))
        z = torch.empty_like(eps)
        z[:, 0] = torch.randn(rows, generator=g, dtype=torch.float64) * sd
        for t in range(1, length):
            z[:, t] = phi * z[:, t - 1] + eps[:, t]
        if kind == "ar1_mean":
            z += stats["mean"]
    mask = torch.ones(rows, length, dtype=torch.bool)
    rho = causal_kalman_filter(z, mask, kalman["kalman_q"], kalman["kalman_v"], kalman["kalman_p0"])
    return float(switch_fractions(z, mask)[0].mean()), float(switch_fractions(rho, mask)[0].mean())


def fmt(values: list[float], f: str = ".3f") -> str:
    """mean +- sd over seeds (min-median-max)."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{f}} +- {sd:{f}} ({spread(values, f)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="run.py preset (e.g. chain); default: the embedded default task")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run (default: the preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--bins",
        type=float,
        nargs="+",
        default=[1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        help="length bin edges (valid tokens)",
    )
    p.add_argument("--min-rows", type=int, default=20, help="bins with fewer rows (per seed) are left out of the fit")
    p.add_argument("--synthetic-rows", type=int, default=256)
    p.add_argument(
        "--also-qv",
        type=float,
        nargs="*",
        default=[1e-4],
        help="also report the switch frequency of the same raw rows filtered post hoc at these Q/V (V=1)",
    )
    p.add_argument(
        "--also-tau",
        type=float,
        nargs="*",
        default=[],
        help="the same post hoc at these tau (Q/V = (tau / max_new_tokens)^2)",
    )
    trained = p.add_mutually_exclusive_group()
    trained.add_argument("--kalman-q", type=float, default=None, help="train with loss.kalman_q=Q")
    trained.add_argument("--kalman-tau", type=float, default=None, help="train with loss.kalman_tau=TAU")
    p.add_argument("--plot", default="benchmarks/ratio_vs_length.png")
    p.add_argument(
        "--records",
        default="outputs/ratio_vs_length/records.pkl",
        help="the runs' per-row records are saved here (pickle)",
    )
    p.add_argument(
        "--from-records",
        action="store_true",
        help="analyse the saved --records instead of training (same tables from the same runs)",
    )
    p.add_argument("overrides", nargs="*", help="extra run.py key=value overrides, e.g. optim.num_minibatches=8")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    start = time.perf_counter()
    minutes = 0.0
    overrides = args.overrides + filter_overrides(args.kalman_q, args.kalman_tau)
    jobs = [(args.preset, s, args.steps, overrides, args.threads) for s in args.seeds]
    if args.from_records:
        with open(args.records, "rb") as f:
            saved = pickle.load(f)
        runs, minutes = saved["runs"], saved["minutes"]
        if [r["seed"] for r in runs] != args.seeds:
            raise SystemExit(f"{args.records} holds seeds {[r['seed'] for r in runs]}, not {args.seeds}")
        print(f"(analysing the runs saved in {args.records}; the times below are theirs)")
    elif args.jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(train_and_record, *zip(*jobs)))
    else:
        runs = [train_and_record(*j) for j in jobs]
    if not args.from_records:
        minutes = (time.perf_counter() - start) / 60
        Path(args.records).parent.mkdir(parents=True, exist_ok=True)
        with open(args.records, "wb") as f:
            pickle.dump({"runs": runs, "minutes": minutes}, f)
    kal = runs[0]["kalman"]
    r0 = runs[0]
    print(
        f"\n{len(runs)} runs (seeds {' '.join(map(str, args.seeds))}; preset={args.preset or '(default task)'}, "
        f"loss {r0['loss']}, {r0['steps']} rollout steps, {r0['minibatches']} mini-batches x {r0['epochs']} epochs "
        f"per rollout, max_new_tokens {r0['max_new_tokens']}{', ' + ' '.join(overrides) if overrides else ''}"
        f") took {minutes:.1f} min with {args.jobs} at a time; per run "
        f"{spread([r['seconds'] for r in runs], '.0f')} s training; filter Q={kal['kalman_q']:g} V={kal['kalman_v']:g} "
        f"P0={kal['kalman_p0']:g}"
    )
    print(machine_line() + "\n")

    post = post_hoc_filters(args.also_qv, args.also_tau, r0["max_new_tokens"])
    extra = tuple(key for key, _, _ in post)
    for run in runs:
        for key, _, qv in post:
            for rec, sw in zip(run["records"], refilter(run["records"], qv, 1.0, kal["kalman_p0"])):
                rec[key] = sw
    per_seed = [bin_stats(r["records"], args.bins, extra) for r in runs]
    qv = kal["kalman_q"] / kal["kalman_v"]
    header = (
        f"| length bin | rows (all seeds) | mean length | switch freq raw | switch freq filtered (Q/V={qv:g}) | "
        + "".join(f"switch freq filtered post hoc at {label} | " for _, label, _ in post)
        + "ratio var raw | ratio var filtered |"
    )
    print("Off-policy rows by valid length; per bin: mean +- sd over seeds (min-median-max)\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for i, (lo, hi) in enumerate(zip(args.bins[:-1], args.bins[1:])):
        cells = [b[i] for b in per_seed if b[i]["rows"] > 0]
        if not cells:
            continue
        col = {k: [c[k] for c in cells] for k in ("length", "sw_raw", "sw_filt", "var_raw", "var_filt") + extra}
        print(
            f"| {lo:g}-{hi:g} | {sum(c['rows'] for c in cells)} | {statistics.fmean(col['length']):.0f} | "
            f"{fmt(col['sw_raw'])} | {fmt(col['sw_filt'], '.4f')} | "
            + "".join(f"{fmt(col[k], '.4f')} | " for k in extra)
            + f"{fmt(col['var_raw'], '.2e')} | "
            f"{fmt(col['var_filt'], '.2e')} |"
        )

    fits = {key: [loglog_fit(b, key, args.min_rows) for b in per_seed] for key in ("sw_raw", "sw_filt") + extra}
    print(f"\nLog-log fit of switch frequency against length, per seed (bins with >= {args.min_rows} rows):")
    names = [("sw_raw", "raw"), ("sw_filt", f"filtered (Q/V={qv:g})")]
    for key, name in names + [(k, f"filtered post hoc at {label}") for k, label, _ in post]:
        ok = [f for f in fits[key] if f is not None]
        if not ok:
            print(f"  {name}: too few bins to fit")
            continue
        slopes = [s for s, _ in ok]
        at = [math.exp(c + s * math.log(PAPER_LENGTH)) for s, c in ok]
        print(
            f"  {name}: slope {fmt(slopes, '.2f')}; extrapolated to {PAPER_LENGTH} tokens: {fmt(at, '.4f')} "
            f"(paper: {PAPER_RAW if name == 'raw' else PAPER_FILTERED}"
            f"{'' if name == 'raw' else ' at Q/V=1e-6'})"
        )

    all_records = [r for run in runs for r in run["records"]]
    stats = raw_statistics(all_records)
    print(
        f"\nRaw log-ratio statistics, pooled over {stats['tokens']} off-policy tokens of all runs: mean "
        f"{stats['mean']:.3e}, variance {stats['var']:.3e}, lag-1 autocorrelation within rows {stats['lag1']:.3f}"
    )
    pool = np.concatenate([r["z"] for r in all_records])
    print(
        f"SYNTHETIC rows ({args.synthetic_rows} per seed, seeds {' '.join(map(str, args.seeds))}), filtered with the "
        "same Q/V/P0: " + "; ".join(f"{k} = {v}" for k, v in SYNTHETIC_KINDS.items())
    )
    synth = {}
    lengths = sorted({round(b["length"]) for b in per_seed[0] if b["rows"] >= args.min_rows}) + [PAPER_LENGTH]
    for kind in SYNTHETIC_KINDS:
        for length in lengths:
            vals = [synthetic_switch(stats, kal, length, args.synthetic_rows, s, kind, pool) for s in args.seeds]
            synth[(kind, length)] = vals
            print(
                f"  SYNTHETIC {kind}, {length} tokens: switch freq raw {fmt([v[0] for v in vals])}, "
                f"filtered {fmt([v[1] for v in vals], '.4f')}"
            )
    for _, label, x in post:
        other = {**kal, "kalman_q": x, "kalman_v": 1.0}
        for kind in SYNTHETIC_KINDS:
            vals = [
                synthetic_switch(stats, other, PAPER_LENGTH, args.synthetic_rows, s, kind, pool) for s in args.seeds
            ]
            print(
                f"  SYNTHETIC {kind}, {PAPER_LENGTH} tokens, filtered at {label}: switch freq filtered "
                f"{fmt([v[1] for v in vals], '.4f')}"
            )

    plot(args, runs, per_seed, fits, synth, lengths, kal, post)
    print(f"\nplot: {args.plot}")


def plot(args, runs, per_seed, fits, synth, lengths, kal, post) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"raw": "tab:red", "filt": "tab:blue"}
    for key, name in (("raw", "raw"), ("filt", "filtered")):
        for j, bins in enumerate(per_seed):
            pts = [(b["length"], b[f"sw_{key}"], b[f"var_{key}"]) for b in bins if b["rows"] >= args.min_rows]
            if not pts:
                continue
            x, sw, var = zip(*pts)
            lab = f"{name} (one line per seed)" if j == 0 else None
            ax1.plot(x, sw, "o-", color=colors[key], alpha=0.6, ms=3, label=lab)
            ax2.plot(x, var, "o-", color=colors[key], alpha=0.6, ms=3, label=lab)
    for (key, label, _), color in zip(post, ("tab:green", "tab:purple", "tab:olive", "tab:cyan", "tab:brown")):
        for j, bins in enumerate(per_seed):
            pts = [(b["length"], b[key]) for b in bins if b["rows"] >= args.min_rows]
            if pts:
                ax1.plot(
                    *zip(*pts),
                    "--",
                    color=color,
                    alpha=0.6,
                    lw=1,
                    label=f"filtered post hoc at {label}" if j == 0 else None,
                )
    grid = np.geomspace(8, PAPER_LENGTH, 50)
    for j, f in enumerate(fits["sw_filt"]):
        if f is not None:
            ax1.plot(
                grid,
                np.exp(f[1] + f[0] * np.log(grid)),
                ":",
                color=colors["filt"],
                alpha=0.5,
                label="filtered, log-log fit extrapolated" if j == 0 else None,
            )
    ax1.plot([PAPER_LENGTH], [PAPER_RAW], "s", color=colors["raw"], mfc="none", ms=8, label="paper, raw (~0.43)")
    ax1.plot(
        [PAPER_LENGTH], [PAPER_FILTERED], "s", color=colors["filt"], mfc="none", ms=8, label="paper, filtered (~0.01)"
    )
    for kind, marker in (("ar1", "x"), ("ar1_mean", "+"), ("resampled", "^")):
        ys = [statistics.fmean(v[1] for v in synth[(kind, L)]) for L in lengths]
        ax1.plot(
            lengths,
            [max(y, 1e-5) for y in ys],
            marker,
            color="k",
            ms=6,
            mfc="none",
            label=f"SYNTHETIC filtered: {SYNTHETIC_KINDS[kind]}",
        )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("response length (valid tokens)")
    ax1.set_ylabel("switch frequency")
    ax1.set_title(f"switch frequency (Q/V={kal['kalman_q'] / kal['kalman_v']:g})")
    ax1.set_ylim(3e-4, 1)
    ax1.legend(fontsize=6, loc="lower left", ncol=2)
    ax2.set_xscale("log")
    ax1.set_xlim(6, 6000)
    ax2.set_xlim(6, 6000)
    ax2.set_yscale("log")
    ax2.set_xlabel("response length (valid tokens)")
    ax2.set_ylabel("ratio variance")
    ax2.set_title("ratio variance over the bin's tokens")
    ax2.legend(fontsize=7)
    r0 = runs[0]
    fig.suptitle(
        f"off-policy mini-batches of {len(runs)} {r0['loss']} runs "
        f"({args.preset or 'default task'}, {r0['steps']} steps, {r0['minibatches']} mini-batches)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
