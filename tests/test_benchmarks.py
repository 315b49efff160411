"""Benchmark scripts print the machine they ran on and min-median-max over repetitions (README figures need both)."""

import re
import subprocess
import sys
from pathlib import Path

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
