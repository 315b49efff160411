"""Building the run's config: schema <- default.yaml <- preset <- --config FILE <- key=value overrides.

`default.yaml` and the built-in presets live inside the package (`kpo_lightning/conf/`, read with
`importlib.resources`, so a plain wheel install finds them; the checkout's top-level `conf/` is a symlink to it).
`preset_dir=DIR` names a folder of the user's own presets: `preset=NAME` reads `DIR/NAME.yaml` when it exists
there, else the built-in one. Unknown keys and wrong types become one-line `UserInputError`s that name the key
(and the closest valid one).
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kpo_lightning.config import Config
from kpo_lightning.errors import UserInputError

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the annotations are strings (from __future__)
    from importlib.resources.abc import Traversable

CONF_DIR: Traversable = files("kpo_lightning") / "conf"  # default.yaml and the built-in presets


def _valid_keys(schema=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        key = prefix + f.name
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_valid_keys(type(default), key + "."))
    return keys


VALID_KEYS = _valid_keys()


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return []
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and key in VALID_KEYS and not _is_leaf(key):
            out.extend(_flat_keys(v, key + "."))
    return out


def _is_leaf(key: str) -> bool:
    return not any(k.startswith(key + ".") for k in VALID_KEYS)


def _check_keys(d: dict, source: str) -> None:
    for key in _flat_keys(d):
        if key not in VALID_KEYS:
            close = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else "; see the config reference in docs/configuration.md"
            raise UserInputError(f"unknown config key {key!r} in {source}{hint}")


def _read_yaml(path: Path | Traversable, what: str) -> dict:
    if not path.is_file():
        raise UserInputError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserInputError(f"{what} {str(path)!r} is not valid YAML{where}: fix the syntax there") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{what} {str(path)!r} must hold a mapping of config keys, not {type(data).__name__}")
    _check_keys(data, str(path))
    return data


def _parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserInputError(f"argument {item!r} is not a key=value override (e.g. loss.type=kpo)")
    try:
        data = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UserInputError(f"could not parse the overrides {overrides}: {e}") from e
    _check_keys(data, "the command line")
    return data


def _presets_in(folder: Path | Traversable) -> dict[str, Path | Traversable]:
    """NAME -> file for every NAME.yaml in `folder` except default.yaml (the base, not a preset)."""
    return {
        f.name[: -len(".yaml")]: f
        for f in folder.iterdir()
        if f.name.endswith(".yaml") and f.name != "default.yaml" and f.is_file()
    }


def _preset_folder(preset_dir: str | None) -> Path | None:
    if preset_dir is None:
        return None
    folder = Path(str(preset_dir)).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"preset_dir={str(preset_dir)!r} is not a folder: give a folder holding NAME.yaml presets")
    return folder


def available_presets(conf_dir: Path | Traversable = CONF_DIR, preset_dir: str | None = None) -> list[str]:
    """Preset names: the built-in ones (in `conf_dir`) and those in the user's `preset_dir`."""
    user = _preset_folder(preset_dir)
    return sorted({**_presets_in(conf_dir), **(_presets_in(user) if user else {})})


def load_config(
    overrides: list[str], config_file: str | None = None, conf_dir: Path | Traversable = CONF_DIR
) -> Config:
    """Merge the layers over the typed schema and return a `Config` object (typed, validated types)."""
    cli = _parse_overrides(overrides)
    file_layer = _read_yaml(Path(config_file), "config file") if config_file else {}
    preset = cli.get("preset", file_layer.get("preset"))
    preset_dir = cli.get("preset_dir", file_layer.get("preset_dir"))
    layers: list[dict] = [_read_yaml(conf_dir / "default.yaml", "config file")]
    if preset_dir is not None and not preset:
        raise UserInputError(
            f"preset_dir={preset_dir!r} is set but preset is not: add preset=NAME (NAME.yaml in that folder)"
        )
    if preset:
        user = _preset_folder(preset_dir)
        found = {**_presets_in(conf_dir), **(_presets_in(user) if user else {})}  # the user's folder wins
        if str(preset) not in found:
            where = f" in preset_dir={str(preset_dir)!r} or built in" if user else ""
            raise UserInputError(
                f"preset={preset!r} is not a preset{where}; use one of {', '.join(sorted(found))}"
                + ("" if user else ", or name your own folder of NAME.yaml files with preset_dir=")
            )
        preset_file = found[str(preset)]
        layers.append(_read_yaml(preset_file, "preset file"))
        if "preset_dir" in layers[-1] or "preset" in layers[-1]:
            raise UserInputError(
                f"preset file {str(preset_file)!r} sets preset/preset_dir: a preset cannot name "
                "another preset; remove that key"
            )
    layers += [file_layer, cli]

    merged: DictConfig = OmegaConf.structured(Config)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            value = _lookup(layer, key)
            raise UserInputError(f"config key {key}={value!r} has the wrong type: {_type_hint(key)}") from e
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _type_hint(key: str) -> str:
    obj: Any = Config()
    for part in key.split("."):
        obj = getattr(obj, part, None)
    if obj == "auto":  # an int-or-"auto" key (rollout.generation_batch_size)
        return "give an integer or auto"
    if isinstance(obj, bool):
        return "give true or false"
    if isinstance(obj, int):
        return "give an integer"
    if isinstance(obj, float):
        return "give a number"
    return "give a string" if isinstance(obj, str) or obj is None else f"give a value like {obj!r}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
