"""Shared fixtures: the character tokenizer and a tiny random Llama, both built in code (no downloads).

Also marks the slow tests (`-m "not slow"` skips them; a plain `python -m pytest` runs everything): end-to-end
runs in subprocesses or several training runs each. They are listed here rather than decorated in their files so
that one place says what the quick subset leaves out (see tests/README.md).
"""

import pytest
import torch

from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model

torch.set_num_threads(1)

# Whole files, and single tests as "file::name" (any parametrization), that are slow.
SLOW = {
    "test_default_job.py",  # the default job learns: ~40 s subprocess
    "test_ddp.py",  # two-process DDP (gloo) subprocesses
    "test_fsdp.py",  # two-process FSDP (gloo) subprocesses, ~150 s of CPU in all
    "test_distributed_runs.py",  # run.py on two gloo processes: split validation, mode=eval, two nodes
    "test_fsdp_collectives.py",  # four two-process (gloo) runs, each killed after 240 s, collectives time out at 20 s
    "test_resume.py",  # several runs, SIGKILL/SIGTERM subprocesses
    "test_cli_errors.py::test_real_process_exit_code_and_debug_traceback",  # two CLI subprocesses
    "test_end_to_end.py::test_run_py_few_steps_writes_tensorboard_and_final_model",
    "test_metrics.py::test_two_process_gloo_sync",  # spawns two processes
    "test_reward_timeouts.py::test_a_run_with_a_stuck_reward_finishes_and_counts_timeouts",  # run.py subprocess
    "test_reward_timeouts.py::test_sigterm_during_a_stuck_reward_stops_the_run",  # run.py subprocess + SIGTERM
    "test_benchmarks.py::test_ratio_vs_length_and_stress_losses_run_end_to_end",  # 4 python subprocesses, ~15 s
    "test_generation_precision.py::test_fsdp_bf16_mixed_rollouts_sample_in_bf16",  # two FSDP processes
    # two DDP processes (gloo) in a subprocess, ~40 s on a loaded machine
    "test_checkpoint_reliability.py::test_a_save_error_on_rank_0_ends_both_ranks_with_one_line",
    "test_reward_processes.py::test_no_process_of_a_run_remains",  # run.py subprocesses (exit, SIGKILL)
    "test_ci.py::test_ci_uses_a_fresh_venv_outside_the_checkout_from_the_repository_root",  # .ci/run makes 2 venvs
    "test_ci.py::test_ci_fails_when_either_part_of_the_command_fails",  # .ci/run makes a venv per case
    "test_ci.py::test_pytest_collecting_no_tests_fails_ci",  # .ci/run makes a venv
}


DIGIT_REWARD = '''
def reward(prompt, completion, answer, **kwargs):
    """Deterministic, varied within groups: rewards completions with many digits 1 to 5, so updates happen."""
    return sum(c in "12345" for c in completion) / max(len(completion), 1)
'''


def tiny_run_args(root, out, *extra: str) -> list[str]:
    """`run.py` overrides for a tiny, fast run on `write_tiny_run_inputs(root)`, writing to `out`; `extra` wins."""
    return [
        f"model.name_or_path={root / 'model'}",
        f"output_dir={out}",
        f"reward.fn={root / 'reward.py'}:reward",
        "data.prompts_per_step=2",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=4",
        "optim.num_minibatches=1",
        "eval.every_n_steps=0",
        "log.samples_every_n_steps=0",
        "log.ratio_plot_every_n_steps=0",
        *extra,
    ]


def write_tiny_run_inputs(root):
    """A tiny random model + char tokenizer in root/model and DIGIT_REWARD in root/reward.py (for run.py tests)."""
    tok = build_char_tokenizer()
    model = build_tiny_random_model(tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "reward.py").write_text(DIGIT_REWARD)
    return root


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        if file in SLOW or f"{file}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def char_tokenizer():
    """Character-level tokenizer: pad=0, eos=1, bos=2, unk=3, left padding."""
    return build_char_tokenizer()


@pytest.fixture
def tiny_model(char_tokenizer):
    """Random tiny Llama (hidden 32, 2 layers), deterministic (seed 0), in eval mode."""
    return build_tiny_random_model(char_tokenizer, seed=0)
