"""`python run.py mode=eval model.name_or_path=PATH data.source=A,B eval.k=16`: avg@k and pass@k per dataset.

The same sampling and reward code as the validation loop during training (`kpo_lightning.rollout.evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch

from kpo_lightning.config import Config
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.models.loading import load_model_and_tokenizer
from kpo_lightning.rollout.engine import HFGenerateEngine, SamplingParams
from kpo_lightning.rollout.evaluation import evaluate_batch, summarize


def run_eval(cfg: Config, reward_fn: Callable[..., float]) -> int:
    pl.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    model.to(device)
    params = SamplingParams.for_eval(cfg.rollout, cfg.eval)
    engine = HFGenerateEngine()
    results = {}
    for source in [s.strip() for s in cfg.data.source.split(",") if s.strip()]:
        data_cfg = dataclasses.replace(cfg.data, source=source, val_source=source)
        datamodule = PromptDataModule(data_cfg, tokenizer=tokenizer, seed=cfg.seed)
        datamodule.setup("validate")
        rewards = [
            evaluate_batch(engine, model, tokenizer, b["prompt"], b["answer"], params, reward_fn)
            for b in datamodule.iter_val_batches()
        ]
        summary = summarize(torch.cat(rewards), cfg.eval.k)
        results[source] = summary
        k = cfg.eval.k
        print(
            f"{source}: avg@{k}={summary['accuracy']:.4f} pass@{k}={summary[f'pass@{k}']:.4f} "
            f"({int(summary['num_prompts'])} prompts)",
            flush=True,
        )

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
