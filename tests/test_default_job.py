"""The embedded default (`python run.py`, no arguments) learns: validation accuracy rises by at least 0.15
absolute, and on the off-policy mini-batches the raw ratios switch sides often while the filtered ones rarely do."""

import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent


def test_default_job_learns(tmp_path):
    out = tmp_path / "default"
    proc = subprocess.run(
        [sys.executable, "run.py", f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    val = sorted((e.step, e.value) for e in acc.Scalars("val/accuracy"))
    assert val[0][0] == 0 and val[-1][0] == 60
    assert val[-1][1] - val[0][1] >= 0.15, val
    raw = [e.value for e in acc.Scalars("train/switch_freq_raw")]
    filtered = [e.value for e in acc.Scalars("train/switch_freq_filtered")]
    assert sum(raw) / len(raw) > 0.25
    assert sum(filtered) / len(filtered) < 0.6 * sum(raw) / len(raw)
    assert (out / "final" / "model.safetensors").exists()
