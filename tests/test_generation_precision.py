"""Training rollouts sample in the training precision: under bf16-mixed the generation forwards see bfloat16
inputs and fill a bfloat16 KV cache (half the float32 one), as validation does, while the policy keeps its float32
master weights; under FSDP likewise, from the gathered bf16 weights. A spy on layer 0's attention
(tests/scripts/rollout_dtypes.py) records what the real RolloutCallback's `generate` runs with."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from rollout_dtypes import main as spy_one_step  # noqa: E402


def spied(out: Path, precision: str) -> dict:
    spy_one_step(out, 1, "auto", precision)
    return json.loads((out / "dtypes-rank0.json").read_text())


def test_bf16_mixed_rollouts_sample_in_bf16_with_a_half_size_cache(tmp_path):
    got = spied(tmp_path, "bf16-mixed")
    assert got["rollout_in"] == got["rollout_out"] == ["torch.bfloat16"]
    assert got["cache_dtype"] == "torch.bfloat16"
    assert got["cache_bytes"] == 2 * math.prod(got["cache_shape"]) * 2  # keys + values, 2 bytes each
    # The training step's forwards (pi_old and the loss) run under autocast on the float32 master weights, which
    # the rollout left in place.
    assert got["train_in"] == ["torch.float32"]
    assert got["param_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize(
    "precision, dtype, size", [("32-true", "torch.float32", 4), ("bf16-true", "torch.bfloat16", 2)]
)
def test_other_precisions_sample_with_their_weights_as_they_are(tmp_path, precision, dtype, size):
    got = spied(tmp_path, precision)
    assert got["rollout_in"] == got["rollout_out"] == got["train_in"] == [dtype] and got["cache_dtype"] == dtype
    assert got["cache_bytes"] == 2 * math.prod(got["cache_shape"]) * size
    assert got["param_dtypes"] == [dtype]


def test_fsdp_bf16_mixed_rollouts_sample_in_bf16(tmp_path):
    """Two FSDP processes (gloo): generation runs on the gathered bfloat16 weights; the shards stay float32."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "rollout_dtypes.py"), str(tmp_path), "2", "fsdp", "bf16-mixed"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"dtypes-rank{rank}.json").read_text())
        assert got["rollout_in"] == ["torch.bfloat16"] and got["cache_dtype"] == "torch.bfloat16", got
        assert got["param_dtypes"] == ["torch.float32"]
