"""`run.py --version` and the one-line startup banner: what users paste into bug reports."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import lightning.pytorch as pl
import torch

import kpo_lightning
from kpo_lightning.cli.main import main
from kpo_lightning.cli.versions import startup_banner
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model

ROOT = Path(__file__).resolve().parent.parent


def test_run_py_version_names_package_dependencies_and_location():
    proc = subprocess.run(
        [sys.executable, "run.py", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    line = lines[0]
    assert line.startswith(f"kpo-lightning {kpo_lightning.__version__} (")
    for needle in (
        f"torch {torch.__version__}",
        f"lightning {version('lightning')}",
        f"transformers {version('transformers')}",
        str(ROOT / "kpo_lightning"),
    ):
        assert needle in line, (needle, line)


def test_version_matches_the_distribution_metadata_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'attr = "kpo_lightning.__version__"' in text  # one place holds the version
    assert kpo_lightning.__version__.count(".") == 2


def test_startup_banner_is_one_line_with_versions_device_and_output(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    banner = startup_banner(trainer, tmp_path / "out")
    assert "\n" not in banner
    for needle in (
        f"kpo-lightning {kpo_lightning.__version__}",
        f"torch {torch.__version__}",
        f"lightning {version('lightning')}",
        f"transformers {version('transformers')}",
        f"device cpu x1 ({torch.get_num_threads()} threads), precision 32-true",
        f"output: {(tmp_path / 'out').resolve()}",
    ):
        assert needle in banner, (needle, banner)


def test_a_training_run_prints_the_banner_first(tmp_path, capsys):
    tok = build_char_tokenizer()
    build_tiny_random_model(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    assert (
        main(
            [
                f"model.name_or_path={tmp_path / 'model'}",
                f"output_dir={out}",
                "trainer.max_steps=1",
                "data.prompts_per_step=2",
                "rollout.num_generations=2",
                "rollout.max_new_tokens=2",
                "optim.num_minibatches=1",
                "eval.every_n_steps=0",
                "log.samples_every_n_steps=0",
                "log.ratio_plot_every_n_steps=0",
            ]
        )
        == 0
    )
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[kpo]")]
    assert printed[0].startswith(f"[kpo] kpo-lightning {kpo_lightning.__version__} | torch ")
    assert printed[0].endswith(f"| output: {out.resolve()}")
