"""Helper for tests/test_fsdp_collectives.py: two gloo CPU processes under the project's FSDP strategy (or DDP),
each writing what it saw to OUT/<scenario>-rank{r}.json. Every process group gets a 20 s collective timeout, so
processes that disagree on their collectives fail within seconds instead of hanging.

Usage: python fsdp_checks.py OUT SCENARIO, SCENARIO one of
  micro_batches   one update on a fixed rollout whose padded length differs by process (rank 0: 17 tokens,
                  rank 1: 9) under optim.max_tokens_per_micro_batch=40: the rows and tokens of every forward
  generate        one training step with real sampling, rank 0 drawing 10 tokens and rank 1 drawing 2: the
                  collectives and forwards inside `generate`, the sampled tokens, and those an unsharded copy
                  of the model draws with the same seed
  nonfinite_ddp / nonfinite_fsdp   tests/scripts/ddp_gradient.py's update with rank 1's loss NaN
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent))
import ddp_gradient  # noqa: E402

from kpo_lightning import KPOModule, RolloutCallback  # noqa: E402
from kpo_lightning.config import OptimConfig, RolloutConfig  # noqa: E402
from kpo_lightning.models.char_tokenizer import build_char_tokenizer  # noqa: E402
from kpo_lightning.models.sharding import is_sharded  # noqa: E402
from kpo_lightning.models.tiny_models import build_tiny_random_model  # noqa: E402
from kpo_lightning.rollout.engine import Generation, HFGenerateEngine, Rollout  # noqa: E402
from kpo_lightning.training.strategies import FSDPStrategy  # noqa: E402

TIMEOUT = timedelta(seconds=20)
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_reduce",
    "broadcast",
    "barrier",
)
CALLS: dict[str, int] = {}


def count_collectives() -> None:
    """Count every call of torch.distributed's collectives by name (FSDP2 and transformers look them up on `dist`
    at call time)."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            CALLS[_name] = CALLS.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def fsdp() -> FSDPStrategy:
    return FSDPStrategy(timeout=TIMEOUT)


def trainer(strategy, callbacks: list) -> pl.Trainer:
    return ddp_gradient.one_step_trainer(callbacks, devices=2, strategy=strategy)


def write(out: Path, scenario: str, rank: int, record: dict) -> None:
    (out / f"{scenario}-rank{rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------- micro_batches
ROWS, PROMPT, RESPONSE_BY_RANK, TOKEN_CAP = 8, 5, (12, 4), 40


def rank_rollout(rank: int, vocab: int) -> Rollout:
    """ROWS rows (2 groups of 4) of this rank's own padded length, every response token valid."""
    gen = torch.Generator().manual_seed(rank)
    width = RESPONSE_BY_RANK[rank]
    ids = torch.randint(5, vocab, (ROWS, PROMPT + width), generator=gen)
    mask = torch.ones(ROWS, width, dtype=torch.bool)
    attention = torch.ones(ROWS, PROMPT + width, dtype=torch.long)
    generation = Generation(ids, attention, mask, PROMPT, [""] * ROWS, torch.zeros(ROWS, dtype=torch.bool))
    rewards = torch.arange(ROWS, dtype=torch.float32) / ROWS
    stats = ddp_gradient.stats(rewards, mask)
    return Rollout(generation, [""] * ROWS, [""] * ROWS, rewards, torch.randn(ROWS, generator=gen), stats)


class RankRollout(RolloutCallback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch["rollout"] = rank_rollout(trainer.global_rank, len(pl_module.tokenizer))


class RecordForwards(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.forwards = out, []

    def on_train_start(self, trainer, pl_module):
        original = pl_module.sequence_logprobs

        def recorded(model, input_ids, *args, **kwargs):
            self.forwards.append(list(input_ids.shape))
            return original(model, input_ids, *args, **kwargs)

        pl_module.sequence_logprobs = recorded

    def on_train_end(self, trainer, pl_module):
        record = {"forwards": self.forwards, "sharded": is_sharded(pl_module.policy)}
        write(self.out, "micro_batches", trainer.global_rank, record)


def micro_batches(out: Path) -> None:
    tok = build_char_tokenizer()
    optim = OptimConfig(lr=1e-3, num_minibatches=1, warmup_ratio=0.0, max_tokens_per_micro_batch=TOKEN_CAP)
    module = KPOModule(
        build_tiny_random_model(tok, seed=0),
        tok,
        optim=optim,
        rollout=RolloutConfig(num_generations=4),
        reward_fn=lambda **kw: 0.0,
    )
    data = torch.utils.data.DataLoader([{"prompt": ["x"], "answer": ["y"]}], batch_size=None)
    trainer(fsdp(), [RankRollout(), RecordForwards(out)]).fit(module, train_dataloaders=data)


# ---------------------------------------------------------------------------------------------- generate
NEW_TOKENS_BY_RANK = (10, 2)
PROMPTS = ["12+34=", "5+6="]


class CountingEngine(HFGenerateEngine):
    """`HFGenerateEngine` that records the collectives and policy forwards inside `generate`, and its output."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def generate(self, model, tokenizer, prompts, params):
        forwards = []
        hook = model.register_forward_hook(lambda m, a, kw, o: forwards.append(1), with_kwargs=True)
        before = dict(CALLS)
        try:
            gen = super().generate(model, tokenizer, prompts, params)
        finally:
            hook.remove()
        # The same draw from a plain, unsharded copy of the initial weights (this is the first rollout).
        plain = HFGenerateEngine().generate(build_tiny_random_model(tokenizer, seed=0), tokenizer, prompts, params)
        self.records.append(
            {
                "collectives": {k: v - before.get(k, 0) for k, v in CALLS.items() if v != before.get(k, 0)},
                "forwards": len(forwards),
                "response_ids": gen.response_ids.tolist(),
                "unsharded_response_ids": plain.response_ids.tolist(),
                "max_new_tokens": params.max_new_tokens,
            }
        )
        return gen


class RecordGeneration(pl.Callback):
    def __init__(self, out: Path, engine: CountingEngine) -> None:
        self.out, self.engine = out, engine

    def on_train_start(self, trainer, pl_module):
        # The counter sees FSDP's gathers: a forward of the sharded policy outside `generate` (both ranks at once).
        before = sum(CALLS.values())
        with torch.no_grad():
            pl_module.policy(input_ids=torch.tensor([[5, 6, 7]]))
        self.sharded_forward = sum(CALLS.values()) - before

    def on_train_end(self, trainer, pl_module):
        record = {"generate": self.engine.records, "sharded_forward_collectives": self.sharded_forward}
        write(self.out, "generate", trainer.global_rank, record)


def generate(out: Path) -> None:
    count_collectives()
    tok = build_char_tokenizer()
    strategy = fsdp()
    engine = CountingEngine()
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    module = KPOModule(
        build_tiny_random_model(tok, seed=0),
        tok,
        optim=OptimConfig(lr=1e-3, num_minibatches=1, warmup_ratio=0.0),
        rollout=RolloutConfig(num_generations=2, max_new_tokens=NEW_TOKENS_BY_RANK[rank]),
        reward_fn=lambda **kw: float(len(kw["completion"]) % 2),
        engine=engine,
    )
    data = torch.utils.data.DataLoader([{"prompt": PROMPTS, "answer": ["46", "11"]}], batch_size=None)
    trainer(strategy, [RecordGeneration(out, engine)]).fit(module, train_dataloaders=data)


# ---------------------------------------------------------------------------------------------- nonfinite
def nonfinite(out: Path, kind: str) -> None:
    """ddp_gradient's one update, rank 1's loss NaN, with this script's collective timeout."""
    ddp_gradient.FSDPStrategy = fsdp  # ddp_gradient builds `FSDPStrategy()` for strategy=fsdp
    strategy = "fsdp" if kind == "fsdp" else DDPStrategy(timeout=TIMEOUT)
    ddp_gradient.main(out, 2, "kpo", "seq-mean-token-mean", strategy=strategy, nan_loss_rank=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, scenario = Path(sys.argv[1]), sys.argv[2]
    if scenario == "micro_batches":
        micro_batches(out_dir)
    elif scenario == "generate":
        generate(out_dir)
    elif scenario in ("nonfinite_ddp", "nonfinite_fsdp"):
        nonfinite(out_dir, scenario.removeprefix("nonfinite_"))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
