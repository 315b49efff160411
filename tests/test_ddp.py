"""Two processes (Lightning DDP, gloo on CPU) on a global batch give the single-process gradient.

The loss normaliser uses the global sequence or token count; each process holds whole groups.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_gradient.py"


def grads(out: Path, world: int, loss: str, agg: str, *extra: str) -> list[dict]:
    out.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(world), loss, agg, *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"grads-rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("loss, agg, extra", [
    ("kpo", "seq-mean-token-mean", ()),
    # two optimizer steps per rollout (the second off-policy) and two micro-batches per step (no_sync path)
    ("grpo", "token-mean", ("num_minibatches=2", "micro_batch_size=2")),
])
def test_two_process_gradient_equals_single_process(tmp_path, loss, agg, extra):
    (single,) = grads(tmp_path / "one", 1, loss, agg, *extra)
    rank0, rank1 = grads(tmp_path / "two", 2, loss, agg, *extra)
    assert single.keys() == rank0.keys() == rank1.keys()
    scale = max(g.abs().max().item() for g in single.values())
    assert scale > 1e-4, "the update is not trivial"
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0)



@pytest.fixture(scope="module")
def float32_single(tmp_path_factory):
    (exact,) = grads(tmp_path_factory.mktemp("ddp") / "one", 1, "kpo", "seq-mean-token-mean")
    return exact


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_two_process_ddp_under_bf16_precisions(tmp_path, float32_single, precision):
    """DDP accepts bf16-mixed and bf16-true: both processes end with one all-reduced gradient, close to the
    single-process float32 one (bf16 rounding only)."""
    rank0, rank1 = grads(tmp_path / "two", 2, "kpo", "seq-mean-token-mean", f"precision={precision}")
    num = sum((rank0[k].float() - g).norm() ** 2 for k, g in float32_single.items()) ** 0.5
    den = sum(g.norm() ** 2 for g in float32_single.values()) ** 0.5
    for name in float32_single:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0)
    # Measured relative error: 0.0039 (bf16-mixed), 0.0060 (bf16-true); about 3x margin.
    assert num / den < 0.02
