"""Benchmark scripts print the machine they ran on and min-median-max over repetitions (docs/ figures need both)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_model, machine_line, spread  # noqa: E402


def test_spread_is_min_median_max():
    assert spread([3.0, 1.0, 2.0, 10.0, 2.5]) == "1.00-2.50-10.00"
    assert spread([7], ".0f") == "7-7-7"


def test_machine_line_names_cpu_cores_threads_and_load():
    line = machine_line()
    assert line.startswith(f"machine: {cpu_model()}, ")
    assert re.search(r"\d+ CPUs \(\d+ usable\)", line) and re.search(r"at \d+ threads", line), line
    assert "load average" in line


def test_filter_speed_prints_machine_and_spread_per_thread_count():
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/filter_speed.py",
            "--quick",
            "--repeats",
            "3",
            "--batch",
            "4",
            "--tokens",
            "64",
            "--threads",
            "1",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert [int(t) for t in re.findall(r"^machine: .* at (\d+) threads", out, re.M)] == [1, 2]
    assert out.count("3 repetitions of the whole measurement") == 2
    rows = re.findall(r"^filter, right padding +(\S+) +(\S+) +(\S+)$", out, re.M)
    assert len(rows) == 2, out
    for row in rows:
        for cell in row:  # median ms, x cumsum (wall), x cumsum (CPU time): each min-median-max
            lo, mid, hi = map(float, cell.split("-"))
            assert 0 < lo <= mid <= hi, cell


def test_ratio_vs_length_bins_pool_tokens_and_fit_recovers_a_power_law():
    import numpy as np
    from ratio_vs_length import bin_stats, loglog_fit

    rng = np.random.default_rng(0)
    records = []
    for length in (10, 12, 40, 50):
        d = rng.normal(0, 0.1, length)
        records.append(
            {
                "length": length,
                "has_pairs": True,
                "sw_raw": 0.4,
                "sw_filt": 2.0 / length,
                "d_raw": (d.sum(), (d**2).sum()),
                "d_filt": (0.0, 0.0),
            }
        )
    bins = bin_stats(records, [8, 16, 64])
    pooled = [r for r in records if r["length"] < 16]
    s = sum(r["d_raw"][0] for r in pooled)
    s2 = sum(r["d_raw"][1] for r in pooled)
    assert bins[0]["rows"] == 2 and bins[0]["length"] == 11
    assert abs(bins[0]["var_raw"] - (s2 / 22 - (s / 22) ** 2)) < 1e-12
    slope, _ = loglog_fit(bins, "sw_filt", min_rows=1)
    assert abs(slope + 1) < 0.05, slope  # sw = 2/L on every row: bin means ~ 1/L (exactly -1 only per row)


def test_ratio_vs_length_synthetic_rows_switch_as_their_distribution_says():
    import numpy as np
    from ratio_vs_length import synthetic_switch

    raw, filt = synthetic_switch(
        {"mean": 0.0, "var": 1e-3, "lag1": 0.0},
        {"kalman_q": 1e-6, "kalman_v": 1.0, "kalman_p0": 0.0},
        512,
        64,
        0,
        "ar1",
    )
    assert abs(raw - 0.5) < 0.02, raw  # measured 0.50
    assert filt < 0.1, filt  # the filter's weighted running sum rarely crosses 0 (measured 0.04)
    raw, _ = synthetic_switch(
        {},
        {"kalman_q": 1e-6, "kalman_v": 1.0, "kalman_p0": 0.0},
        512,
        64,
        0,
        "resampled",
        np.array([-1.0, 1.0, 2.0, -2.0]),
    )
    assert abs(raw - 0.5) < 0.02, raw  # tokens drawn iid from a symmetric pool: sign flips half the time
    raw, _ = synthetic_switch(
        {},
        {"kalman_q": 1e-6, "kalman_v": 1.0, "kalman_p0": 0.0},
        512,
        64,
        0,
        "resampled",
        np.array([-1.0, 1.0, 2.0, 3.0]),
    )
    assert abs(raw - 0.375) < 0.02, raw  # P(>0) = 3/4: flips 2 * 3/4 * 1/4 of the time


def test_stress_losses_counts_a_nonfinite_stop_or_halved_accuracy_as_collapse():
    from stress_losses import Run, summarize

    def run(rc, before, after):
        r = Run(1e-4, "grpo", None, 0, Path("."), rc=rc)
        r.scalars = {
            "val/accuracy": [(0, before)] + ([(10, after)] if after is not None else []),
            "train/reward": [(i, 0.5) for i in range(1, 11)],
        }
        return summarize(r, 0.5)

    assert not run(0, 0.3, 0.2)["collapsed"]
    assert run(0, 0.3, 0.1)["collapsed"]
    assert run(1, 0.3, None)["collapsed"] and run(1, 0.3, None)["nonfinite_stop"]


def test_ratio_vs_length_and_stress_losses_run_end_to_end(tmp_path):
    """Both scripts on the tiny default task: machine line first, their tables, the SYNTHETIC lines and the PNGs."""
    small = ["data.val_size=8", "eval.k=2", "data.prompts_per_step=4", "optim.num_minibatches=2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "benchmarks/ratio_vs_length.py",
                "--steps",
                "2",
                "--seeds",
                "0",
                "--jobs",
                "1",
                "--synthetic-rows",
                "8",
                "--min-rows",
                "1",
                "--plot",
                str(tmp_path / "rvl.png"),
                "--records",
                str(tmp_path / "records.pkl"),
            ]
            + small,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "benchmarks/stress_losses.py",
                "--steps",
                "1",
                "--seeds",
                "0",
                "1",
                "--losses",
                "grpo",
                "--minibatches",
                "2",
                "--jobs",
                "2",
                "--out",
                str(tmp_path / "runs"),
                "--plot",
                str(tmp_path / "sl.png"),
            ]
            + small[:3],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("machine: "), out[:200]
    rvl, sl = outs[0][0], outs[1][0]
    assert re.search(r"^\| 8-16 \| \d+ \| \d+ \| [\d.]+ \+- ", rvl, re.MULTILINE), rvl
    assert "SYNTHETIC ar1, 4096 tokens: switch freq raw" in rvl and "SYNTHETIC resampled, 4096 tokens" in rvl
    assert re.search(
        r"^\| 0\.0001 \| grpo \| [\d.]+ \| [\d.]+ \+- [\d.]+ \([\d.-]+\) \|.*\| \d/2 \|", sl, re.MULTILINE
    ), sl
    assert (tmp_path / "rvl.png").stat().st_size > 10_000 and (tmp_path / "sl.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "lr0.0001-grpo-seed1" / "tensorboard").is_dir()


def test_stress_losses_runs_each_kpo_loss_once_per_q_and_per_tau():
    """--kalman-q and --kalman-tau give KPO losses one cell each ('paper' = the loss's own paper Q, set explicitly;
    'default' = neither key, run.py's default filter); other losses run once. The commands set what the cells say."""
    from argparse import Namespace

    from stress_losses import build_runs, cell_name

    from kpo_lightning.cli.config_loading import load_config
    from kpo_lightning.training.module import _loss_options

    args = Namespace(
        lrs=[1e-4],
        losses=["grpo", "kpo", "kpo_clipped"],
        kalman_q=["paper", 2e-3],
        kalman_tau=[4.0, "default"],
        seeds=[0],
        preset="chain",
        out="out",
        steps=16,
        minibatches=8,
        epochs=None,
        eval_every=None,
        overrides=[],
    )
    runs = build_runs(args)
    assert [cell_name(*r.cell) for r in runs] == [
        "grpo",
        "kpo Q=0.0001",
        "kpo Q=0.002",
        "kpo tau=4",
        "kpo",
        "kpo_clipped Q=1e-06",
        "kpo_clipped Q=0.002",
        "kpo_clipped tau=4",
        "kpo_clipped",
    ]
    assert [r.out.name for r in runs][5:] == [
        "lr0.0001-kpo_clipped-q1e-06-seed0",
        "lr0.0001-kpo_clipped-q0.002-seed0",
        "lr0.0001-kpo_clipped-tau4-seed0",
        "lr0.0001-kpo_clipped-seed0",
    ]
    expected_q = [None, 1e-4, 2e-3, (4 / 160) ** 2, (4 / 160) ** 2, 1e-6, 2e-3, (4 / 160) ** 2, (4 / 160) ** 2]
    for run, q in zip(runs, expected_q):
        overrides = run.cmd[2:]  # after python run.py
        assert overrides[0] == "preset=chain" and "optim.num_minibatches=8" in overrides
        assert sum(o.startswith(("loss.kalman_q=", "loss.kalman_tau=")) for o in overrides) <= 1
        cfg = load_config(overrides)
        opts = _loss_options(cfg.loss, cfg.rollout.max_new_tokens)
        assert opts.get("kalman_q") == (None if q is None else pytest.approx(q, rel=1e-12)), run.out.name


def test_ratio_vs_length_filters_from_q_or_tau():
    from ratio_vs_length import filter_overrides, post_hoc_filters

    assert filter_overrides(None, None) == []
    assert filter_overrides(1e-6, None) == ["loss.kalman_q=1e-06"]
    assert filter_overrides(None, 4.0) == ["loss.kalman_tau=4.0"]
    post = post_hoc_filters([1e-4], [1.0, 4.0], max_new_tokens=160)
    assert [(key, label) for key, label, _ in post] == [
        ("sw_qv0.0001", "Q/V=0.0001"),
        ("sw_tau1", "tau=1 (Q/V=3.91e-05)"),
        ("sw_tau4", "tau=4 (Q/V=0.000625)"),
    ]
    assert [qv for _, _, qv in post] == pytest.approx([1e-4, (1 / 160) ** 2, (4 / 160) ** 2], rel=1e-12)
