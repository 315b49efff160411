"""The math and every other non-glue module import without Lightning: plain functions on tensors stay usable (and
testable) on their own. Only the glue listed here may import `lightning`."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import kpo_lightning

# The Lightning glue: the LightningModule, DataModule, callbacks, strategies and the jobs that build a Trainer.
GLUE = {
    "checkpointing",
    "datamodule",
    "evaluate_main",
    "module",
    "rollout_callback",
    "sharded_generation",
    "strategies",
    "train_main",
}
MATH = ("kalman", "losses", "advantages", "logprobs", "sequence_logprobs", "metrics")
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")

# Imports each module in turn in a fresh interpreter; after each, records which Lightning packages are loaded.
CHILD = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module("kpo_lightning." + name)
    loaded[name] = sorted({key.split(".")[0] for key in sys.modules} & set(LIGHTNING_NAMES))
print(json.dumps(loaded))
""".replace("LIGHTNING_NAMES", repr(LIGHTNING))


def pure_modules() -> list[str]:
    names = sorted(p.stem for p in Path(kpo_lightning.__file__).parent.glob("*.py") if p.stem != "__init__")
    return [name for name in names if name not in GLUE]


def test_math_and_other_pure_modules_do_not_import_lightning():
    """Math first, so that a failure names the first module that pulled Lightning in."""
    names = list(MATH) + [name for name in pure_modules() if name not in MATH]
    assert set(MATH) <= set(pure_modules())
    env = {**os.environ, "PYTHONPATH": str(Path(kpo_lightning.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", CHILD, *names], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next((name for name, pkgs in loaded.items() if pkgs), None)  # later ones are imported with it loaded
    assert first is None, f"importing kpo_lightning.{first} pulled in {loaded[first]}"


def test_glue_list_names_real_modules():
    """GLUE names only existing modules: a stale or misspelt entry would hide nothing but mislead."""
    here = {p.stem for p in Path(kpo_lightning.__file__).parent.glob("*.py")}
    assert GLUE <= here, GLUE - here


def test_package_imports_are_absolute():
    """`from kpo_lightning.x import y` everywhere, never `from .x import y`: one spelling, greppable."""
    for path in sorted(Path(kpo_lightning.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                where = f"{path.name}:{node.lineno}"
                assert node.level == 0, f"{where}: relative import from {'.' * node.level}{node.module}"
