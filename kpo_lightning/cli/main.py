"""`python run.py [--config FILE.yaml] [--plan [--device-memory-gib N]] [key=value ...]`: validate everything,
then train or evaluate (or, with --plan, print the memory budget per process: kpo_lightning/cli/plan.py).

Input errors print one line and exit 2 (`debug=true` shows the traceback); nothing heavy is loaded before the
config, the data source, the model path, the reward function and the resume path have been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.cli.config_loading import available_presets, load_config, to_yaml
from kpo_lightning.config import Config
from kpo_lightning.errors import UserInputError

EXIT_INPUT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="KPO fine-tuning of language models (Lightning). Overrides are key=value (docs/configuration.md)",
    )
    p.add_argument("--config", help="a YAML file of config keys, merged over the defaults and preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--version",
        action="store_true",
        help="print the versions of kpo-lightning, torch, lightning, transformers and python, and exit",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the memory budget per process from the model's config.json (no weights, no GPU) and exit: "
        "0 when it fits, 2 (with what to change) when it does not",
    )
    p.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        metavar="N",
        help="with --plan: plan for devices of N GiB (default: the free memory of this machine's GPU)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.type=kpo preset=smollm2")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)
    try:
        args = _parser().parse_intermixed_args(argv)  # options between overrides too
        if args.version:
            from kpo_lightning.cli.versions import version_line

            print(version_line())
            return 0
        cfg = load_config(args.overrides, args.config)
        check_config(cfg)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.plan:
            from kpo_lightning.cli.plan import run_plan

            return run_plan(cfg, args.device_memory_gib)
        if args.device_memory_gib is not None:
            raise UserInputError("--device-memory-gib only applies with --plan: add --plan or drop it")
        return run(cfg)
    except UserInputError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR


def check_inputs(cfg: Config):
    """Everything a run needs from outside, checked before the model is loaded. Returns the reward function."""
    from kpo_lightning.data.datamodule import PromptDataModule
    from kpo_lightning.models.loading import check_model_source
    from kpo_lightning.rewards.scoring import reward_from_config

    if cfg.mode == "eval":  # several datasets, comma-separated, each read whole as validation data
        for source in cfg.data.source.split(","):
            one = source.strip()
            PromptDataModule.check_source(dataclasses.replace(cfg.data, source=one, val_source=one))
    else:
        PromptDataModule.check_source(cfg.data)
    check_model_source(cfg.model)
    return reward_from_config(cfg.reward)


def run(cfg: Config) -> int:
    reward_fn = check_inputs(cfg)
    if cfg.mode == "eval":
        from kpo_lightning.cli.evaluate import run_eval

        return run_eval(cfg, reward_fn)
    from kpo_lightning.cli.train import run_train

    return run_train(cfg, reward_fn)


__all__ = ["main", "available_presets"]
