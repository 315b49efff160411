"""A user's reward function imported by spec: "package.module:function" or "path/to/file.py:function".

Used by the trainer (to check a spec at start) and by the reward worker processes (to run it); imports nothing
else of the package but its errors, so that a worker child starts fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any

from kpo_lightning.errors import UserInputError

FORMS = "'math', 'package.module:function' or 'path/to/file.py:function'"


def _import_file(path: str, spec: str) -> Any:
    """Import a .py file as a uniquely named module (registered in sys.modules so pickling works)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise UserInputError(
            f"reward function {spec!r}: file {full} does not exist; fix the path (relative "
            f"paths are resolved from the working directory {os.getcwd()})"
        )
    name = (
        "kpo_user_reward_"
        + re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
        + f"_{zlib.crc32(full.encode()):08x}"
    )
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, full)
    if mspec is None or mspec.loader is None:
        raise UserInputError(f"reward function {spec!r}: cannot load {full} as Python; give a .py file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserInputError(
            f"reward function {spec!r}: importing {full} failed with {type(e).__name__}: {e}; fix the file"
        ) from e
    return module


def _import_module(modname: str, spec: str) -> Any:
    """Import a dotted module, turning 'not found' and import-time errors into UserInputError."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        missing = e.name or modname
        if modname == missing or modname.startswith(missing + "."):
            raise UserInputError(
                f"reward function {spec!r}: module {modname!r} not found; install it, add its "
                f"directory to PYTHONPATH, or use the file form 'path/to/file.py:function'"
            ) from e
        raise UserInputError(
            f"reward function {spec!r}: module {modname!r} needs {missing!r}, which is not installed; pip install it"
        ) from e
    except Exception as e:
        raise UserInputError(
            f"reward function {spec!r}: importing {modname!r} failed with {type(e).__name__}: {e}; fix the module"
        ) from e


def load_user_function(spec: str) -> Callable[..., float]:
    """The user's reward function named by `spec` ("package.module:function" or "path/to/file.py:function"),
    imported in this process. Every problem with `spec` raises UserInputError naming the fix."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"reward function spec {spec!r} is empty or not a string; use {FORMS}")
    spec = spec.strip()
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserInputError(f"reward function spec {spec!r} is not understood; use {FORMS}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise UserInputError(
            f"reward function spec {spec!r}: {target!r} is neither a dotted module name nor a "
            f"path to a .py file; use {FORMS}"
        )
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserInputError(
                f"reward function {spec!r}: {target!r} has no attribute {attr!r}; fix the name "
                f"after ':' (callables there: {', '.join(names[:20]) or 'none'})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(
            f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; point the spec at a function"
        )
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some C callables: nothing to check
    try:
        sig.bind(prompt="", completion="", answer="")
    except TypeError as e:
        raise UserInputError(
            f"reward function {spec!r} has signature {sig}, but it is called as "
            f"fn(prompt=..., completion=..., answer=...); define it as "
            f"def {attr.split('.')[-1]}(prompt, completion, answer, **kwargs) -> float ({e})"
        ) from e
    return obj
