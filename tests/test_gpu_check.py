"""scripts/gpu_check.py's verdicts: a non-finite loss or gradient norm, a skipped optimizer step, or a measured peak
above the plan by more than its margin fail a variant; and its model carries Qwen3's real vocabulary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(step=1, loss=0.1, grad_norm=0.5, skipped=0.0):
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "skipped_steps": skipped}


def test_a_clean_variant_passes(gpu_check):
    assert gpu_check.problems([row(1), row(2)], {"peak_gib": 10.0, "plan_gib": 10.0}) == []
    assert gpu_check.problems([row()], {"peak_gib": float("nan"), "plan_gib": 1.0}) == []  # CPU: no peak measured


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([row(loss=float("nan"))], "loss nan"),
        ([row(grad_norm=float("inf"))], "grad_norm inf"),
        ([row(1), row(2, skipped=1.0)], "skipped"),
    ],
)
def test_non_finite_values_and_skipped_steps_fail(gpu_check, rows, needle):
    found = gpu_check.problems(rows, {"peak_gib": 1.0, "plan_gib": 1.0})
    assert len(found) == 1 and needle in found[0]


def test_a_peak_above_the_plan_by_more_than_the_margin_fails(gpu_check):
    inside = 10.0 * (1 + gpu_check.PEAK_MARGIN) - 0.01
    assert gpu_check.problems([row()], {"peak_gib": inside, "plan_gib": 10.0}) == []
    found = gpu_check.problems([row()], {"peak_gib": inside + 0.02, "plan_gib": 10.0})
    assert len(found) == 1 and "exceeds the plan" in found[0]


def test_the_check_model_has_qwen3_s_vocabulary(gpu_check, tmp_path):
    folder = gpu_check.tiny_qwen3(tmp_path / "m", cpu=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 151_936 and config["model_type"] == "qwen3" and config["tie_word_embeddings"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 151_936 and tok("12+3=")["input_ids"] == [5, 6, 14, 7, 18]  # characters encode as before
    assert tok.decode([5, 100_000, 151_935]) == "1<100000><151935>"  # filler ids decode to text with digits
