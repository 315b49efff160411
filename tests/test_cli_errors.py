"""Bad input: one clear line naming the key, value or path, exit code 2, no traceback (unless debug=true)."""

import subprocess
import sys
from pathlib import Path

import pytest

from kpo_lightning.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def run_main(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "override, needles",
    [
        ("loss.tpye=kpo", ["loss.tpye", "did you mean loss.type"]),
        ("optim.lr=fast", ["optim.lr", "fast"]),
        ("trainer.max_steps=1.5", ["trainer.max_steps"]),
        ("loss.type=ppo", ["loss.type", "ppo", "kpo_clipped"]),
        ("loss.kalman_q=0", ["loss.kalman_q", "> 0"]),
        ("loss.kalman_v=-1", ["loss.kalman_v"]),
        ("loss.clip_low=1.5", ["loss.clip_low", "(0, 1)"]),
        ("rollout.num_generations=1", ["rollout.num_generations", ">= 2"]),
        ("optim.num_minibatches=0", ["optim.num_minibatches"]),
        ("rollout.max_new_tokens=0", ["rollout.max_new_tokens"]),
        ("rollout.temperature=-1", ["rollout.temperature"]),
        ("trainer.max_steps=0", ["trainer.max_steps"]),
        ("optim.num_minibatches=3", ["optim.num_minibatches=3", "data.prompts_per_step=8"]),
        ("resume=/nonexistent/step-1.ckpt", ["resume", "/nonexistent/step-1.ckpt"]),
        ("preset=nope", ["preset", "nope"]),
        ("notakeyvalue", ["notakeyvalue", "key=value"]),
        ("model.lora.dropout=0.1", ["model.lora.dropout=0.1", "set model.lora.dropout=0.0"]),
        ("reward.worker_memory_mb=-1", ["reward.worker_memory_mb", ">= 0"]),
    ],
)
def test_config_errors(capsys, override, needles):
    assert_one_line_error(*run_main(capsys, override), *needles)


def test_data_errors(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert_one_line_error(*run_main(capsys, f"data.source={missing}"), str(missing))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(*run_main(capsys, f"data.source={empty}"), str(empty))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops}\n')
    assert_one_line_error(*run_main(capsys, f"data.source={bad}"), str(bad), "2")

    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"q": "1+1=", "a": "2"}\n')
    assert_one_line_error(*run_main(capsys, f"data.source={nofield}"), str(nofield), "prompt")

    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 3)
    assert_one_line_error(*run_main(capsys, f"data.source={few}", "data.val_size=5"), "data.val_size=5")


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    assert_one_line_error(*run_main(capsys, f"model.name_or_path={tmp_path}"), str(tmp_path), "config.json")
    assert_one_line_error(*run_main(capsys, f"model.name_or_path={tmp_path / 'nope'}"), str(tmp_path / "nope"))


def test_reward_fn_that_cannot_be_imported(capsys):
    assert_one_line_error(*run_main(capsys, "reward.fn=no_such_module:score"), "no_such_module")
    assert_one_line_error(*run_main(capsys, "reward.fn=math:no_such_fn"), "no_such_fn")


def test_config_file_errors(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss:\n  type: [kpo\n")
    assert_one_line_error(*run_main(capsys, "--config", str(broken)), str(broken), "YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 0.1\n")
    assert_one_line_error(*run_main(capsys, "--config", str(unknown)), "optim.learning_rate")
    assert_one_line_error(*run_main(capsys, "--config", str(tmp_path / "none.yaml")), "none.yaml")


def test_real_process_exit_code_and_debug_traceback(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("saved before")
    cmd = [sys.executable, "run.py", "loss.kalman_q=-1", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "loss.kalman_q" in proc.stderr
    assert (out / "keep.txt").read_text() == "saved before"  # nothing already saved is lost

    proc = subprocess.run(cmd + ["debug=true"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_print_config_of_presets(capsys):
    for preset in ("paper", "smollm2"):
        assert main([f"preset={preset}", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen3-4B" in out and "kalman_q: 1.0e-06" in out


def test_preset_dir_holds_the_users_own_presets(capsys, tmp_path):
    mine = tmp_path / "presets"
    mine.mkdir()
    (mine / "tiny.yaml").write_text("trainer:\n  max_steps: 7\n")
    (mine / "paper.yaml").write_text("model:\n  name_or_path: my/own-paper-model\n")  # shadows the built-in one
    assert main([f"preset_dir={mine}", "preset=tiny", "--print-config"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    assert main([f"preset_dir={mine}", "preset=paper", "--print-config"]) == 0
    assert "my/own-paper-model" in capsys.readouterr().out
    assert main([f"preset_dir={mine}", "preset=smollm2", "--print-config"]) == 0  # built-in ones stay reachable
    assert "name_or_path: smollm2" in capsys.readouterr().out
    in_file = tmp_path / "run.yaml"
    in_file.write_text(f"preset_dir: {mine}\npreset: tiny\n")
    assert main(["--config", str(in_file), "--print-config"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_preset_dir_errors(capsys, tmp_path):
    assert_one_line_error(
        *run_main(capsys, f"preset_dir={tmp_path / 'nope'}", "preset=x"), "preset_dir", str(tmp_path / "nope")
    )
    assert_one_line_error(*run_main(capsys, f"preset_dir={tmp_path}", "preset=x"), "preset='x'", "preset_dir", "paper")
    assert_one_line_error(*run_main(capsys, f"preset_dir={tmp_path}"), "preset_dir", "preset=NAME")
    (tmp_path / "loop.yaml").write_text("preset: paper\n")
    assert_one_line_error(*run_main(capsys, f"preset_dir={tmp_path}", "preset=loop"), "loop.yaml", "preset")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # the paper preset's 32 prompts x 4 mini-batches on 2 x 8 GPUs: 2 prompts per process, 4 mini-batches
        (
            ["trainer.devices=8", "trainer.num_nodes=2", "data.prompts_per_step=32", "optim.num_minibatches=4"],
            ["data.prompts_per_step=32 over 16 processes", "use data.prompts_per_step=64"],
        ),
        (["trainer.devices=0,1,2", "data.prompts_per_step=8", "optim.num_minibatches=1"], ["over 3 processes"]),
    ],
)
def test_prompts_that_do_not_split_over_the_processes_are_refused_up_front(capsys, overrides, needles):
    assert_one_line_error(*run_main(capsys, *overrides), *needles)


def test_prompts_that_split_over_the_processes_pass_the_check():
    from kpo_lightning.cli.config_checks import check_config
    from kpo_lightning.config import Config

    cfg = Config()
    cfg.trainer.devices, cfg.trainer.num_nodes = "8", 2
    cfg.data.prompts_per_step, cfg.optim.num_minibatches = 64, 4
    check_config(cfg)
    cfg.trainer.devices = "auto"  # the count is known only at run time: left to the first batch
    cfg.data.prompts_per_step = 4
    check_config(cfg)
