"""Two gloo CPU processes (tests/scripts/fsdp_checks.py): what each process does, checked against its own data.

- FSDP micro-batches: the processes run the same number of forwards (each is a collective), the most either needs,
  and every forward of every process keeps within `micro_batch_size` rows and `max_tokens_per_micro_batch` tokens
  of its own padded length.
- Sharded generation: the weights are gathered once, before `generate`; inside it there is no FSDP all-gather
  (only transformers' one all-reduce per decoding step that keeps processes in step, `synced_gpus`), though the
  processes draw 10 and 2 tokens; the draws equal an unsharded copy's.
- A non-finite loss on one process skips the step on both (DDP and FSDP), within the script's 20 s collective
  timeout when they disagree, not a hang.

Each run has a 20 s timeout on every collective (a disagreement fails in seconds) and the test kills the whole
process group after RUN_TIMEOUT_S (CPU start-up of two processes is most of a run: ~40 s wall on the loaded 2-core
machine, ~6 s of CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_checks.py"
RUN_TIMEOUT_S = 240
ROWS, TOKEN_CAP, LENGTH_BY_RANK = 8, 40, (17, 9)  # as in the script: prompt 5 + responses of 12 and 4 tokens


def run_two_processes(out: Path, scenario: str) -> list[dict]:
    """Runs the scenario; a hang is killed (with rank 1, Lightning's child) after RUN_TIMEOUT_S and fails."""
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{scenario}: no result within {RUN_TIMEOUT_S} s\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-3000:]
    prefix = "run" if scenario.startswith("nonfinite") else scenario
    return [json.loads((out / f"{prefix}-rank{r}.json").read_text()) for r in range(2)]


def test_fsdp_micro_batches_keep_each_process_within_its_own_caps(tmp_path):
    ranks = run_two_processes(tmp_path / "mb", "micro_batches")
    assert [r["sharded"] for r in ranks] == [True, True]
    forwards = [r["forwards"] for r in ranks]
    assert len(forwards[0]) == len(forwards[1])  # every sharded forward is a collective
    for rank, shapes in enumerate(forwards):
        length = LENGTH_BY_RANK[rank]
        assert all(cols == length for _, cols in shapes)
        assert sum(rows for rows, _ in shapes) == ROWS  # every row once
        assert all(rows * length <= TOKEN_CAP for rows, _ in shapes), (rank, shapes)
    # Rank 0 (17 tokens a row) needs ceil(8 / (40 // 17)) = 4 micro-batches; rank 1 (9 tokens) only 2 of its own.
    assert len(forwards[0]) == 4


def test_sharded_generate_gathers_once_though_processes_stop_at_different_lengths(tmp_path):
    ranks = run_two_processes(tmp_path / "gen", "generate")
    for rank, record in enumerate(ranks):
        assert record["sharded_forward_collectives"] > 0  # the counter sees FSDP's all-gathers
        (gen,) = record["generate"]
        assert gen["max_new_tokens"] == (10, 2)[rank]
        assert len(gen["response_ids"][0]) == gen["max_new_tokens"]  # the draws stopped at different lengths
        # No all-gather (or any other collective) inside generate but transformers' synced_gpus flag: one
        # all-reduce per decoding step of the longest process (10 forwards) and one at the end.
        assert gen["collectives"] == {"all_reduce": gen["forwards"] + 1}, gen["collectives"]
        assert gen["forwards"] == 10
        assert gen["response_ids"] == gen["unsharded_response_ids"]  # sampled from the whole, current weights


def assert_both_skipped(out: Path, scenario: str) -> None:
    """Both processes counted one skipped step and neither stepped: both hold the initial model."""
    ranks = run_two_processes(out, scenario)
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    init = build_tiny_random_model(build_char_tokenizer(), seed=0).state_dict()
    for rank in range(2):
        weights = torch.load(out / f"weights-rank{rank}.pt")
        for name, w in weights.items():
            assert torch.equal(w, init[name]), (rank, name)


def test_a_nonfinite_loss_on_one_ddp_process_skips_the_step_on_both(tmp_path):
    assert_both_skipped(tmp_path / "ddp", "nonfinite_ddp")


def test_a_nonfinite_loss_on_one_fsdp_process_skips_the_step_on_both_or_fails_fast(tmp_path):
    assert_both_skipped(tmp_path / "fsdp", "nonfinite_fsdp")
