"""Helper for tests/test_generation_precision.py: one training step with the real `RolloutCallback` (sampling with
`HFGenerateEngine`), spying on layer 0's attention while the rollout is sampled and while the step trains.

Writes OUT/dtypes-rank{r}.json: the dtypes of q_proj's inputs and outputs seen during the rollout and during the
training step, the dtype and bytes of the KV cache the rollout's `generate` filled (layer 0's keys and values),
and the policy's parameter dtypes after the step.
Usage: python rollout_dtypes.py OUT DEVICES STRATEGY PRECISION (STRATEGY: auto, ddp or fsdp)
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers.cache_utils import Cache

from kpo_lightning import KPOModule, RolloutCallback
from kpo_lightning.config import OptimConfig, RolloutConfig
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model
from kpo_lightning.training.strategies import FSDPStrategy

sys.path.insert(0, str(Path(__file__).parent))  # ddp_gradient, also when this file is imported by a test
from ddp_gradient import one_step_trainer  # noqa: E402


class Spy(RolloutCallback):
    """The real callback, with a phase flag around its sampling and hooks on layer 0's attention."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "train"
        self.seen: dict[str, set[str]] = {"rollout_in": set(), "rollout_out": set(), "train_in": set()}
        self.caches: list[Cache] = []

    def on_train_start(self, trainer, pl_module):
        attn = pl_module.policy.model.layers[0].self_attn
        attn.q_proj.register_forward_hook(self._q_proj)
        attn.register_forward_pre_hook(self._cache, with_kwargs=True)

    def _q_proj(self, module, inputs, output):
        if self.phase == "rollout":
            self.seen["rollout_in"].add(str(inputs[0].dtype))
            self.seen["rollout_out"].add(str(output.dtype))
        else:
            self.seen["train_in"].add(str(inputs[0].dtype))

    def _cache(self, module, args, kwargs):
        if self.phase == "rollout":
            self.caches += [v for v in kwargs.values() if isinstance(v, Cache) and v not in self.caches]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.phase = "rollout"
        try:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        finally:
            self.phase = "train"


class Report(pl.Callback):
    def __init__(self, out: Path, spy: Spy) -> None:
        self.out, self.spy = out, spy

    def on_train_end(self, trainer, pl_module):
        layer = self.spy.caches[0].layers[0]
        result = {
            **{k: sorted(v) for k, v in self.spy.seen.items()},
            "cache_dtype": str(layer.keys.dtype),
            "cache_bytes": layer.keys.nbytes + layer.values.nbytes,
            "cache_shape": list(layer.keys.shape),
            "param_dtypes": sorted({str(p.dtype) for p in pl_module.policy.parameters()}),
        }
        (self.out / f"dtypes-rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out: Path, devices: int, strategy: str, precision: str) -> None:
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    model = build_tiny_random_model(tok, seed=0)
    module = KPOModule(
        model,
        tok,
        optim=OptimConfig(num_minibatches=1, lr=1e-3, warmup_ratio=0.0),
        rollout=RolloutConfig(num_generations=4, max_new_tokens=6),
        reward_fn=lambda completion, **kw: float(len(completion) % 2),
    )
    data = torch.utils.data.DataLoader([{"prompt": ["1+2=", "3+4="], "answer": ["3", "7"]}], batch_size=None)
    spy = Spy()
    trainer = one_step_trainer(
        [spy, Report(out, spy)],
        devices=devices,
        strategy=FSDPStrategy() if strategy == "fsdp" else strategy,
        precision=precision,
    )
    trainer.fit(module, train_dataloaders=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
