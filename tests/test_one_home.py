"""Every list of names, every range and every exception type has one home: the config checks, the Python API
(`KPOModule`, `compute_policy_loss`, `group_advantages`) and the registries agree because they share it."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import kpo_lightning
from kpo_lightning.algorithms.advantages import ESTIMATORS, group_advantages
from kpo_lightning.algorithms.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    LOSS_DEFAULTS,
    LOSS_OPTIONS,
    LOSS_TYPES,
    OPTION_RANGES,
    compute_policy_loss,
    resolve_loss_options,
)
from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.config import Config, LossConfig
from kpo_lightning.errors import UserInputError

PACKAGE = Path(kpo_lightning.__file__).parent


def config_error(**loss) -> str | None:
    """check_config's message for a default config with these loss.* values, or None when it passes."""
    cfg = Config()
    cfg.loss = dataclasses.replace(cfg.loss, **loss)
    try:
        check_config(cfg)
    except UserInputError as e:
        return str(e)
    return None


def api_error(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except UserInputError as e:
        return str(e)
    return None


def tiny_batch():
    logp = torch.full((2, 3), -1.0)
    return logp, logp.clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)


def test_loss_option_names_are_the_registry_s_and_config_fields():
    """The loss-specific options are read off the registry, and each one is a LossConfig field."""
    from_registry = {name for defaults in LOSS_DEFAULTS.values() for name in defaults} - {"agg", "beta", "kl_estimator"}
    assert set(LOSS_OPTIONS) == from_registry
    assert set(LOSS_OPTIONS) <= {f.name for f in dataclasses.fields(LossConfig)}


def test_module_passes_every_set_option_of_the_loss_type():
    """KPOModule hands the loss exactly the options the registry gives its type (no list of its own)."""
    from kpo_lightning.training.module import _loss_options

    every = {name: 0.5 for name in LOSS_OPTIONS}  # set in the config, whether the type takes it or not
    for loss_type in LOSS_TYPES:
        opts = _loss_options(LossConfig(type=loss_type, **every), max_new_tokens=16)
        assert set(opts) - {"agg"} == set(LOSS_DEFAULTS[loss_type]) & set(LOSS_OPTIONS), loss_type


def test_unknown_loss_type_is_one_message_everywhere(tiny_model, char_tokenizer):
    """The config check, KPOModule and compute_policy_loss raise the very same line for loss.type."""
    from kpo_lightning.training.module import KPOModule

    expected = f"loss.type='ppo' is invalid: use one of {', '.join(LOSS_TYPES)}"
    assert config_error(type="ppo") == expected
    assert api_error(KPOModule, tiny_model, char_tokenizer, loss=LossConfig(type="ppo")) == expected
    assert api_error(compute_policy_loss, "ppo", *tiny_batch()) == expected
    for loss_type in LOSS_TYPES:
        assert config_error(type=loss_type) is None


@pytest.mark.parametrize("name", sorted(OPTION_RANGES.keys() - {"normalizer"}))
@pytest.mark.parametrize("value", [-1.0, 0.0, 1e-6, 0.5, 1.0, 1.5, 3.0, 1e6, float("inf")])
def test_option_ranges_agree_between_config_and_api(name, value):
    """Each loss.* number is accepted by the config check exactly when the loss accepts it, with the same line."""
    loss_type = next(t for t in LOSS_TYPES if name in LOSS_DEFAULTS[t] or name not in LOSS_OPTIONS)
    from_config = config_error(type=loss_type, **{name: value})
    opts = {name: value, "ref_logp": torch.zeros(2, 3)} if name == "beta" else {name: value}
    from_api = api_error(resolve_loss_options, loss_type, **opts)
    assert from_config == from_api, (from_config, from_api)


def test_clip_bounds_lie_in_the_open_unit_interval():
    """The range chosen for clip_low / clip_high (spec: clip(r, 1 - eps_low, 1 + eps_high)): (0, 1)."""
    for value in (0.0, 1.0, -0.1, 1.5):
        assert "(0, 1)" in config_error(clip_low=value) and "(0, 1)" in config_error(clip_high=value)
    for value in (1e-4, 0.2, 0.99):
        assert config_error(clip_low=value, clip_high=value) is None


def test_name_lists_are_the_registries():
    """Every name a registry knows passes the config check, and the API refuses what the config refuses."""
    for agg in AGG_MODES:
        assert config_error(agg=agg) is None
    for estimator in KL_ESTIMATORS:
        assert config_error(kl_estimator=estimator) is None
    for estimator in ESTIMATORS:
        assert config_error(advantage=estimator) is None
        group_advantages(torch.tensor([0.0, 1.0]), 2, estimator)
    assert config_error(agg="mean") == api_error(resolve_loss_options, "grpo", agg="mean")
    assert config_error(kl_estimator="k4") == api_error(resolve_loss_options, "grpo", kl_estimator="k4")
    assert config_error(advantage="ppo") == api_error(group_advantages, torch.tensor([0.0, 1.0]), 2, "ppo")


def test_every_exception_class_lives_in_errors_py():
    """No module but errors.py defines an exception type (so every `except` matches the one class)."""
    elsewhere = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases
            ):
                elsewhere.append(f"{path.name}:{node.name}")
    assert all(entry.startswith("errors.py:") for entry in elsewhere), elsewhere
    assert {"errors.py:UserInputError", "errors.py:NonFiniteTrainingError", "errors.py:CheckpointSaveError"} <= set(
        elsewhere
    )


def test_exceptions_are_matched_by_class_not_by_name():
    """No module compares an exception's class name to a string (`except` / isinstance on the class instead)."""
    for path in sorted(PACKAGE.glob("*.py")):
        for line in path.read_text().splitlines():
            assert not re.search(r"(exception|exc|err|\be)\)\.__name__\s*(==|!=|in\b)", line), (path.name, line)


def test_sampling_defaults_are_the_rollout_config_s():
    """SamplingParams() samples as the default config does (its defaults are read off RolloutConfig)."""
    from kpo_lightning.config import RolloutConfig
    from kpo_lightning.rollout.engine import SamplingParams

    assert SamplingParams() == SamplingParams.for_training(RolloutConfig())


def test_weight_dtype_per_accepted_precision():
    """One function says which weights each precision trains: float32 (master) weights but under bf16-true."""
    from kpo_lightning.cli.config_checks import PRECISIONS
    from kpo_lightning.models.loading import training_dtype, weight_dtype

    assert {p: weight_dtype(p) for p in PRECISIONS} == {
        "32-true": torch.float32,
        "bf16-mixed": torch.float32,
        "bf16-true": torch.bfloat16,
    }
    for precision in PRECISIONS:
        assert training_dtype("bfloat16", precision) == training_dtype("float32", precision) == weight_dtype(precision)


def test_config_table_names_every_accepted_value():
    """The config reference row (docs/configuration.md) of each key with a list of names names every accepted value."""
    from kpo_lightning.cli.config_checks import MODES, PRECISIONS, STRATEGIES

    table = (PACKAGE.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    accepted = {
        "mode": MODES,
        "loss.type": LOSS_TYPES,
        "loss.agg": AGG_MODES,
        "loss.kl_estimator": KL_ESTIMATORS,
        "loss.advantage": ESTIMATORS,
        "trainer.strategy": STRATEGIES,
        "trainer.precision": PRECISIONS,
    }
    for key, names in accepted.items():
        row = re.search(rf"^\| `{re.escape(key)}` \| .*$", table, flags=re.MULTILINE)
        assert row, f"docs/configuration.md has no config row for {key}"
        missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", row.group(0))]
        assert not missing, f"docs/configuration.md's {key} row does not name {missing}"


def test_shared_loss_defaults_are_the_config_s():
    """compute_policy_loss without options aggregates, and weighs KL, as the default config does."""
    for loss_type in LOSS_TYPES:
        for name in ("agg", "beta", "kl_estimator"):
            assert LOSS_DEFAULTS[loss_type][name] == getattr(LossConfig(), name)
