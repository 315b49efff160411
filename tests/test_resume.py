"""Checkpoint and resume: a run stopped and resumed ends exactly where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kpo_lightning.char_tokenizer import build_char_tokenizer
from kpo_lightning.checkpointing import list_checkpoints
from kpo_lightning.cli import main
from kpo_lightning.tiny_models import build_tiny_random_model

ROOT = Path(__file__).resolve().parent.parent

REWARD = '''
def reward(prompt, completion, answer, **kwargs):
    """Deterministic, varied within groups: rewards completions with many digits 1 to 5, so updates happen."""
    return sum(c in "12345" for c in completion) / max(len(completion), 1)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = build_char_tokenizer()
    model = build_tiny_random_model(tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "reward.py").write_text(REWARD)
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={root / 'model'}", f"output_dir={out}", f"reward.fn={root / 'reward.py'}:reward",
        "data.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=6",
        "optim.num_minibatches=2", "optim.lr=3e-3", "optim.warmup_ratio=0", "eval.every_n_steps=0",
        "log.samples_every_n_steps=0", "log.ratio_plot_every_n_steps=0", *extra,
    ]


def rewards_by_step(out: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/reward")]


def test_stop_and_resume_matches_uninterrupted_run(setup):
    whole, split = setup / "whole", setup / "split"
    assert main(args(setup, whole, "trainer.max_steps=8", "checkpoint.every_n_steps=4")) == 0
    assert main(args(setup, split, "trainer.max_steps=4", "checkpoint.every_n_steps=4")) == 0
    assert main(args(setup, split, "trainer.max_steps=8", "checkpoint.every_n_steps=4", "resume=auto")) == 0

    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(setup / "model" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4, "training changed the weights"
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    ra, rb = rewards_by_step(whole), rewards_by_step(split)
    assert [s for s, _ in ra] == list(range(1, 9))
    assert sorted(s for s, _ in rb) == list(range(1, 9))  # no step repeated or skipped
    assert dict(ra) == pytest.approx(dict(rb), abs=1e-6)


def test_resume_auto_without_checkpoint_starts_fresh(setup, capsys):
    out = setup / "fresh"
    assert main(args(setup, out, "trainer.max_steps=1", "resume=auto")) == 0
    assert "starting fresh" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001.ckpt"]


def test_sigkill_then_resume_auto_finishes(setup):
    out = setup / "killed"
    cmd = [sys.executable, "run.py", *args(setup, out, "trainer.max_steps=60", "checkpoint.every_n_steps=1",
                                          "checkpoint.keep_last=2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(out / "checkpoints")) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.1)  # likely mid-step, maybe mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = list_checkpoints(out / "checkpoints")[-1]
    assert not (out / "final").exists()

    done = subprocess.run([*cmd, "resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing from {killed_at}" in done.stdout
    assert (out / "final" / "model.safetensors").exists()
    steps = sorted(s for s, _ in rewards_by_step(out))
    assert steps[-1] == 60 and len(set(steps)) == 60


def test_sigterm_saves_between_steps_and_exits(setup):
    out = setup / "terminated"
    cmd = [sys.executable, "run.py", *args(setup, out, "trainer.max_steps=200", "checkpoint.every_n_steps=0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    tb = out / "tensorboard"
    while time.time() < deadline and not (tb.exists() and any(tb.iterdir())) and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(3.0)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert not (out / "final").exists()  # stopped, not finished
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1, output[-2000:]  # no periodic saves: this one was written on SIGTERM
    step = int(ckpts[0].stem.split("-")[1])
    assert 0 < step < 200
    assert f"saved {ckpts[0]}" in output
