"""A normal (non-editable) install runs: build the wheel, install it into a fresh venv and run `kpo-train` from a
folder outside the checkout, so configs, presets and the shipped tiny model must come from the installed package.

The venv sees the system's site-packages (torch, lightning, ... are not downloaded again: `pip install --no-deps
--no-index`), where the developer's editable install of kpo-lightning may live too; the test asserts the wheel's
copy is the one imported. About 30 s on an idle 2-core machine, most of it the one training step.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_checkout_conf_is_the_package_conf():
    """One copy of the YAMLs: the checkout's conf/ is (a link to) kpo_lightning/conf, so the two cannot drift."""
    assert (ROOT / "conf").resolve() == (ROOT / "kpo_lightning" / "conf").resolve()
    assert {"default.yaml", "paper.yaml", "smollm2.yaml"} <= {p.name for p in (ROOT / "conf").iterdir()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, environment, a working folder outside the checkout, the wheel) after installing."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # build from a copy, so no build/ or egg-info lands in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kpo_lightning", src / "kpo_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
        env=env,
    )
    (wheel,) = (tmp / "dist").glob("kpo_lightning-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    # pip comes from the system site-packages; run by the venv's python it installs into the venv
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp, env=env
    )
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return bin_dir, env, elsewhere, wheel


def test_wheel_ships_configs_presets_and_tiny_model(installed):
    import kpo_lightning

    assert installed[3].name.startswith(f"kpo_lightning-{kpo_lightning.__version__}-")  # the version's one source
    names = set(zipfile.ZipFile(installed[3]).namelist())
    for name in ("default.yaml", "paper.yaml", "smollm2.yaml", "chain.yaml"):
        assert f"kpo_lightning/conf/{name}" in names
    assert "kpo_lightning/assets/tiny-arith/model.safetensors" in names
    assert "kpo_lightning/assets/tiny-chain/model.safetensors" in names
    assert not any(n.startswith(("conf/", "tests/", "benchmarks/")) for n in names)


def test_installed_wheel_is_what_runs(installed):
    bin_dir, env, elsewhere, _ = installed
    where = run(
        [str(bin_dir / "python"), "-c", "import kpo_lightning; print(kpo_lightning.__file__)"], cwd=elsewhere, env=env
    ).strip()
    assert Path(where).is_relative_to(bin_dir.parent), f"imported {where}, not the venv's wheel"
    version = run([str(bin_dir / "kpo-train"), "--version"], cwd=elsewhere, env=env)
    assert version.startswith("kpo-lightning ") and str(Path(where).parent) in version, version


def test_installed_print_config_and_presets(installed):
    bin_dir, env, elsewhere, _ = installed
    default = yaml.safe_load(run([str(bin_dir / "kpo-train"), "--print-config"], cwd=elsewhere, env=env))
    assert default["model"]["name_or_path"] == "tiny-arith"
    paper = yaml.safe_load(run([str(bin_dir / "kpo-train"), "preset=paper", "--print-config"], cwd=elsewhere, env=env))
    assert paper["model"]["name_or_path"] == "Qwen/Qwen3-4B" and paper["preset"] == "paper"
    mine = elsewhere / "my_presets"
    mine.mkdir()
    (mine / "short.yaml").write_text("trainer:\n  max_steps: 3\n")
    short = yaml.safe_load(
        run(
            [str(bin_dir / "kpo-train"), f"preset_dir={mine}", "preset=short", "--print-config"], cwd=elsewhere, env=env
        )
    )
    assert short["trainer"]["max_steps"] == 3


def test_installed_default_job_trains_one_step(installed):
    """The shipped tiny-arith model and the arithmetic task load from the installed package."""
    bin_dir, env, elsewhere, _ = installed
    out = run(
        [
            str(bin_dir / "kpo-train"),
            "trainer.max_steps=1",
            "eval.every_n_steps=0",
            "output_dir=run",
            "data.prompts_per_step=2",
            "rollout.num_generations=2",
            "optim.num_minibatches=1",
        ],
        cwd=elsewhere,
        env=env,
    )
    assert "[kpo] kpo-lightning " in out and (elsewhere / "run" / "final" / "model.safetensors").exists()
