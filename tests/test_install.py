"""A normal (non-editable) install runs: build the wheel, install it into a fresh venv and run `kpo-train` from a
folder outside the checkout, so configs, presets and the shipped tiny model must come from the installed package.

The new venv sees the site-packages of the interpreter running the tests, whatever that is (a venv, a conda env or
a plain interpreter: a `.pth` file lists them, where `--system-site-packages` would expose the base interpreter's
instead of the enclosing venv's), so torch, lightning, ... are not downloaded again (`pip install --no-deps
--no-index`). The developer's editable install of kpo-lightning may live there too; the test asserts the wheel's
copy is the one imported. About 30 s on an idle 2-core machine, most of it the one training step.
"""

import os
import shutil
import site
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


def parent_site_packages() -> list[str]:
    """The site-packages of the interpreter running the tests (its own venv's or conda env's, not its base's)."""
    paths = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [p for p in paths if os.path.isdir(p)]


def see_parent_site_packages(python: Path, env: dict) -> None:
    """Append the parent's site-packages to the new venv's path with a `.pth` file. Paths named in a `.pth` are added
    as they are (their own `.pth` files, such as an editable install's finder, are not run)."""
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], ".", env).strip()
    Path(purelib, "_kpo_test_parent_env.pth").write_text("\n".join(parent_site_packages()) + "\n")


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
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    see_parent_site_packages(bin_dir / "python", env)
    # pip comes from the parent's site-packages; run by the venv's python it installs into the venv
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
