"""The package's architecture, read from its import graph: sub-packages in layers whose imports flow one way (down),
no import cycle between modules, the math and every other non-glue module importable without Lightning, and the
public names where users look for them."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kpo_lightning

PACKAGE = Path(kpo_lightning.__file__).parent

# Bottom to top. A module may import its own sub-package and any lower layer, never a layer at its height or above.
LAYERS = {
    "config": 0,  # the typed config dataclasses (kpo_lightning/config.py)
    "errors": 0,  # the exceptions (kpo_lightning/errors.py)
    "algorithms": 1,
    "models": 1,
    "rewards": 1,
    "data": 2,
    "rollout": 3,
    "training": 4,
    "cli": 5,
}
# The Lightning glue: the DataModule, the callbacks, the module, the strategy and the jobs that build a Trainer.
GLUE = {
    "data.datamodule",
    "rollout.callback",
    "training.checkpointing",
    "training.module",
    "training.strategies",
    "cli.evaluate",
    "cli.train",
}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below `kpo_lightning` ('algorithms.kalman', 'config', ...)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, at module level or inside functions (a lazy import is still a
    dependency). `from kpo_lightning.x import y` names module `x.y` when that is a module, else `x`."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            if name.startswith("kpo_lightning."):
                rest = name[len("kpo_lightning.") :]
                while rest and rest not in known:
                    rest = rest.rpartition(".")[0]
                if rest:
                    deps.add(rest)
                    break
            elif name == "kpo_lightning":
                deps.add("")  # the root package: only its __version__ may be read from inside
    return deps


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, known) for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_sits_in_a_layer():
    """A new sub-package or root module must be placed in LAYERS before it can be imported by anything."""
    assert {m.split(".")[0] for m in modules()} == set(LAYERS)


def test_imports_flow_down_the_layers():
    upward = []
    for source, deps in graph().items():
        for dep in deps:
            if dep == "":
                continue
            same_package = dep.split(".")[0] == source.split(".")[0]
            if not same_package and layer(dep) >= layer(source):
                upward.append(f"kpo_lightning.{source} imports kpo_lightning.{dep}")
    assert not upward, upward


def test_inside_the_package_the_root_is_read_for_its_version_only():
    """`from kpo_lightning import KPOModule` inside the package would hide an upward import behind the lazy root."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "kpo_lightning":
                assert [a.name for a in node.names] == ["__version__"], f"{name}:{node.lineno}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None (depth-first search, colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(edges):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    edges = {m: {d for d in deps if d and d != m} for m, deps in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_an_upward_import_is_seen(tmp_path):
    """The graph reader sees a lazy import inside a function (how the old reward cycle was hidden)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from kpo_lightning.training.module import KPOModule\n")
    assert imported(src, set(modules())) == {"training.module"}


# Imports each module in turn in a fresh interpreter; after each, records which Lightning packages are loaded.
CHILD = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module("kpo_lightning." + name)
    loaded[name] = sorted({key.split(".")[0] for key in sys.modules} & set(LIGHTNING_NAMES))
print(json.dumps(loaded))
""".replace("LIGHTNING_NAMES", repr(LIGHTNING))


def test_math_and_other_pure_modules_do_not_import_lightning():
    """The whole `algorithms` sub-package first, so that a failure names the first module that pulled Lightning in."""
    math = [m for m in modules() if m.startswith("algorithms")]
    others = [m for m in modules() if m not in GLUE and m not in math]
    assert not set(math) & GLUE
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *math, *others], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next((name for name, pkgs in loaded.items() if pkgs), None)  # later ones are imported with it loaded
    assert first is None, f"importing kpo_lightning.{first} pulled in {loaded[first]}"


def test_glue_list_names_real_modules():
    """GLUE names only existing modules: a stale or misspelt entry would hide nothing but mislead."""
    assert set(modules()) >= GLUE, GLUE - set(modules())


def test_package_imports_are_absolute():
    """`from kpo_lightning.x import y` everywhere, never `from .x import y`: one spelling, greppable."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                assert node.level == 0, f"{where}: relative import from {'.' * node.level}{node.module}"


def test_each_sub_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "layer" in doc.lower() and len(doc) > 200, f"{init}: docstring should name its layer"


@pytest.mark.parametrize("name", kpo_lightning.__all__)
def test_public_names_import_from_the_top(name):
    assert getattr(kpo_lightning, name) is getattr(
        importlib.import_module(f"kpo_lightning.{kpo_lightning._EXPORTS[name]}"), name
    )
