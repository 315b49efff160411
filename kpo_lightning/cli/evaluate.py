"""`python run.py mode=eval model.name_or_path=PATH data.source=A,B eval.k=16`: avg@k and pass@k per dataset.

The same sampling, reward and gathering code as the validation loop during training (`KPOModule.validation_step`,
`kpo_lightning.rollout.evaluation`), run by a Lightning `Trainer.validate` on every configured device
(`trainer.devices`, `trainer.num_nodes`, `trainer.strategy`, `trainer.precision`): each process samples its share
of each dataset's prompts, the results are gathered once, and rank 0 prints and writes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl

from kpo_lightning.cli.train import placement
from kpo_lightning.config import Config
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.errors import UserInputError
from kpo_lightning.models.loading import load_model_and_tokenizer
from kpo_lightning.training.module import KPOModule


def run_eval(cfg: Config, reward_fn: Callable[..., float]) -> int:
    pl.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model)  # in model.dtype, as asked (no master weights)
    no_reference = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, beta=0.0))
    module = KPOModule.from_config(model, tokenizer, no_reference, reward_fn, master_weights=False)
    trainer = pl.Trainer(
        **placement(cfg),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,  # the data module gives each process its share
        default_root_dir=cfg.output_dir,
    )
    results = {}
    for source in [s.strip() for s in cfg.data.source.split(",") if s.strip()]:
        data_cfg = dataclasses.replace(cfg.data, source=source, val_source=source)
        datamodule = PromptDataModule(data_cfg, tokenizer=tokenizer, seed=cfg.seed)
        module.last_val_summary = {}
        trainer.validate(module, datamodule=datamodule, verbose=False)
        if not module.last_val_summary:
            raise UserInputError(
                f"data.source={source}: no prompt left to evaluate (all longer than data.max_prompt_tokens="
                f"{cfg.data.max_prompt_tokens}, or data.val_size=0); raise them"
            )
        summary = dict(module.last_val_summary)
        results[source] = summary
        k = cfg.eval.k
        if trainer.is_global_zero:
            print(
                f"{source}: avg@{k}={summary['accuracy']:.4f} pass@{k}={summary[f'pass@{k}']:.4f} "
                f"({int(summary['num_prompts'])} prompts)",
                flush=True,
            )
    if not trainer.is_global_zero:
        return 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard_eval")) as writer:
        for source, summary in results.items():
            name = Path(source).stem if Path(source).suffix else source.replace("/", "_")
            for key, value in summary.items():
                writer.add_scalar(f"eval/{name}/{key}", value, 0)
    print(f"[kpo] results: {out / 'eval_results.json'}; TensorBoard: tensorboard --logdir {out / 'tensorboard_eval'}")
    return 0
