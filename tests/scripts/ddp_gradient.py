"""Helper for tests/test_ddp.py and tests/test_fsdp.py: one KPO update on a fixed rollout, on 1 process or on N
with Lightning DDP or the project's FSDP2 strategy (gloo).

Rank r of N gets groups [r*k, (r+1)*k) of the same global rollout (and its own rollout stats). Writes the gradient
each process sees at the (last) optimizer step (after DDP's all-reduce; FSDP's reduce-scattered shards gathered
whole) to OUT/grads-rank{r}.pt, the whole weights after training to OUT/weights-rank{r}.pt, and to
OUT/run-rank{r}.json the logged values ("logs", combined over processes) and this process's own ("own_logs").
Usage: python ddp_gradient.py OUT WORLD LOSS AGG [key=value ...] (strategy=fsdp, precision=bf16-mixed, clip_low,
clip_high, optim keys)
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import kpo_lightning.algorithms.step_logs as step_logs
from kpo_lightning import KPOModule, RolloutCallback
from kpo_lightning.config import LossConfig, OptimConfig, RolloutConfig
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.sharding import is_sharded
from kpo_lightning.models.tiny_models import build_tiny_random_model
from kpo_lightning.rollout.engine import Generation, Rollout
from kpo_lightning.training.strategies import FSDPStrategy

GROUPS, G, P, R = 4, 4, 5, 7


def global_rollout(vocab: int) -> Rollout:
    """A fixed rollout of GROUPS x G rows with ragged responses (eos at different places) and holes-free masks."""
    gen = torch.Generator().manual_seed(1)
    n = GROUPS * G
    ids = torch.randint(5, vocab, (n, P + R), generator=gen)
    lengths = torch.randint(1, R + 1, (n,), generator=gen)
    response_mask = torch.arange(R)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(n, P, dtype=torch.long), response_mask.long()], dim=1)
    advantages = torch.randn(n, generator=gen)
    rewards = torch.randint(0, 3, (n,), generator=gen).float() / 2
    generation = Generation(ids, attention, response_mask, P, [""] * n, torch.zeros(n, dtype=torch.bool))
    return Rollout(generation, [""] * n, [""] * n, rewards, advantages, stats(rewards, response_mask))


def stats(rewards: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """The rollout stats of these rows (a subset of make_rollout's)."""
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "time_generate_s": 0.0,
        "time_score_s": 0.0,
        "generated_tokens": float(response_mask.sum()),
    }


def shard(r: Rollout, rank: int, world: int) -> Rollout:
    rows = slice(rank * GROUPS // world * G, (rank + 1) * GROUPS // world * G)
    g = r.generation
    gen = Generation(
        g.input_ids[rows],
        g.attention_mask[rows],
        g.response_mask[rows],
        g.prompt_length,
        g.completions[rows],
        g.truncated[rows],
    )
    return Rollout(
        gen,
        r.prompts[rows],
        r.answers[rows],
        r.rewards[rows],
        r.advantages[rows],
        stats(r.rewards[rows], g.response_mask[rows]),
    )


def as_seen_by_two_processes(r: Rollout, num_minibatches: int) -> Rollout:
    """Reorder groups so one process's mini-batch m is the union of two processes' mini-batches m (each process
    splits its own half of the groups into mini-batches)."""
    half, per_mb = GROUPS // 2, GROUPS // 2 // num_minibatches
    order = [rank * half + m * per_mb + j for m in range(num_minibatches) for rank in range(2) for j in range(per_mb)]
    rows = torch.tensor([g * G + i for g in order for i in range(G)])
    g = r.generation
    gen = Generation(
        g.input_ids[rows],
        g.attention_mask[rows],
        g.response_mask[rows],
        g.prompt_length,
        [g.completions[i] for i in rows],
        g.truncated[rows],
    )
    return Rollout(gen, r.prompts, r.answers, r.rewards[rows], r.advantages[rows], dict(r.stats))


class FixedRollout(RolloutCallback):
    def __init__(self, rollout: Rollout) -> None:
        super().__init__()
        self.rollout = rollout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch["rollout"] = shard(self.rollout, trainer.global_rank, trainer.world_size)


def one_step_trainer(callbacks: list, **overrides) -> pl.Trainer:
    """A CPU Trainer for one rollout step of a fixed rollout: no logger, checkpoints, progress bar or summary, no
    distributed sampler (each process shards the rollout itself). `overrides` (devices, strategy, precision,
    limit_train_batches) win."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return pl.Trainer(**{**kwargs, **overrides}, callbacks=callbacks)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP DTensor shard is gathered (a collective: every rank calls it in the same order)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class SaveGrads(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: whole(p.grad) for n, p in pl_module.policy.named_parameters() if p.grad is not None}
        torch.save(grads, self.out / f"grads-rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        weights = {n: whole(p) for n, p in pl_module.policy.named_parameters()}
        torch.save(weights, self.out / f"weights-rank{rank}.pt")
        names = {id(p): n for n, p in pl_module.policy.named_parameters()}
        groups = [sorted(names[id(p)] for p in g["params"]) for g in trainer.optimizers[0].param_groups]
        (self.out / f"run-rank{rank}.json").write_text(
            json.dumps(
                {
                    "logs": pl_module.last_logs,
                    "own_logs": OWN_LOGS,
                    "skipped_steps": pl_module.skipped_steps,
                    "groups": groups,
                    "sharded": [is_sharded(m) for m in [pl_module.policy, *pl_module._reference]],
                    "dtypes": [str(next(m.parameters()).dtype) for m in [pl_module.policy, *pl_module._reference]],
                    # whole (logical) bytes of the weights, sharded or not
                    "param_bytes": [
                        sum(p.numel() * p.element_size() for p in m.parameters())
                        for m in [pl_module.policy, *pl_module._reference]
                    ],
                    "metric_state_dtypes": sorted(
                        {
                            str(getattr(metric, state).dtype)
                            for c in (pl_module.ratio_metrics_raw, pl_module.ratio_metrics_filtered)
                            for metric in c.values()
                            for state in metric._defaults
                        }
                    ),
                    "weight_decay": [g["weight_decay"] for g in trainer.optimizers[0].param_groups],
                }
            )
        )


OWN_LOGS: dict[str, float] = {}  # this process's own values of the last step (before combining over processes)
_combine = step_logs.combine


def _recording_combine(values, reduce, device="cpu"):
    OWN_LOGS.update({f"train/{k}": v for k, v in _combine(values, None).items()})
    return _combine(values, reduce, device)


step_logs.combine = _recording_combine


class NonFiniteLossOn(pl.Callback):
    """Makes one process's loss NaN while its gradient stays finite (a constant NaN is added to the loss)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != self.rank:
            return
        original = pl_module._micro_batch_loss

        def nan_loss(*args, **kwargs):
            loss, metrics, logp = original(*args, **kwargs)
            return loss + torch.tensor(float("nan")), metrics, logp

        pl_module._micro_batch_loss = nan_loss


def main(
    out: Path,
    world: int,
    loss_type: str,
    agg: str,
    precision: str = "32-true",
    gradient_checkpointing: bool = False,
    strategy: str = "ddp",
    nan_loss_rank: int = -1,
    beta: float = 0.0,
    clip_low: float | None = None,
    clip_high: float | None = None,
    **optim,
) -> None:
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    model = build_tiny_random_model(tok, seed=0)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optim = {"lr": 1e-3, "num_minibatches": 1, "grad_clip": 0.0, "warmup_ratio": 0.0, **optim}
    loss = LossConfig(type=loss_type, agg=agg, beta=beta, clip_low=clip_low, clip_high=clip_high)
    module = KPOModule(
        model,
        tok,
        loss=loss,
        optim=OptimConfig(**optim),
        rollout=RolloutConfig(num_generations=G),
        reward_fn=lambda **kw: 0.0,
    )
    data = torch.utils.data.DataLoader([{"prompt": ["x"], "answer": ["y"]}], batch_size=None)
    rollout = global_rollout(len(tok))
    if world == 1:
        rollout = as_seen_by_two_processes(rollout, optim["num_minibatches"])
    if world == 1:
        strategy = "auto"
    elif strategy == "fsdp":
        strategy = FSDPStrategy()
    trainer = one_step_trainer(
        [FixedRollout(rollout), SaveGrads(out), NonFiniteLossOn(nan_loss_rank)],
        devices=world,
        strategy=strategy,
        precision=precision,
    )
    trainer.fit(module, train_dataloaders=data)


def number(text: str):
    """int, float or the text itself (for key=value arguments)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    # e.g. num_minibatches=2 strategy=fsdp
    extra = {k: number(v) for k, v in (a.split("=") for a in sys.argv[5:])}
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], **extra)
