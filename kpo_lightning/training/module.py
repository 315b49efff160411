"""`KPOModule`: the LightningModule that owns the policy, the reference snapshot and the KPO surrogate loss.

Thin glue: the math lives in `losses`, `kalman`, `logprobs`, `advantages`; sampling in `rollout`. One training
step is one rollout: the `RolloutCallback` puts the rollout into the batch, then this module runs
`optim.epochs_per_rollout x optim.num_minibatches` optimizer steps on it (manual optimisation), so every
mini-batch after the first is off-policy, which is where the Kalman filter acts.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MetricCollection

from kpo_lightning.algorithms.kalman import causal_kalman_filter, tau_at
from kpo_lightning.algorithms.losses import (
    DEFAULT_KALMAN_TAU,
    KPO_LOSSES,
    LOSS_DEFAULTS,
    LOSS_OPTIONS,
    aggregation_normalizer,
    check_loss_type,
    compute_policy_loss,
    kalman_options,
    short_filter_warning,
)
from kpo_lightning.algorithms.metrics import RatioMean, RatioVariance, SwitchFrequency
from kpo_lightning.algorithms.sequence_logprobs import sequence_logprobs
from kpo_lightning.algorithms.step_logs import StepLogs
from kpo_lightning.config import (
    Config,
    EvalConfig,
    LogConfig,
    LossConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
)
from kpo_lightning.data.datamodule import VAL_PADDING
from kpo_lightning.errors import NonFiniteTrainingError, UserInputError
from kpo_lightning.models.loading import (
    decay_parameter_names,
    disable_dropout,
    store_reference_in_compute_dtype,
    weight_dtype,
)
from kpo_lightning.models.sharding import is_sharded
from kpo_lightning.rewards.scoring import reward_from_config
from kpo_lightning.rollout.callback import RolloutCallback, RolloutInputs
from kpo_lightning.rollout.engine import HFGenerateEngine, Rollout, RolloutEngine, SamplingParams
from kpo_lightning.rollout.evaluation import evaluate_batch
from kpo_lightning.rollout.sharded_generation import full_weights_for_generation
from kpo_lightning.training.strategies import FSDPStrategy


def _loss_options(cfg: LossConfig, max_new_tokens: int) -> dict[str, Any]:
    """The loss options set in the config (None means: the loss type's paper default), and a KPO loss's filter
    (`kalman_options`: kalman_q or kalman_tau, else the length-aware default)."""
    known = LOSS_DEFAULTS[cfg.type]
    opts = {n: getattr(cfg, n) for n in LOSS_OPTIONS if getattr(cfg, n) is not None and n in known}
    if cfg.type in KPO_LOSSES:
        opts.update(kalman_options(cfg, max_new_tokens))
    opts["agg"] = cfg.agg
    if cfg.agg == "seq-mean-token-sum-norm":
        opts["agg_norm_constant"] = cfg.agg_norm_constant or float(max_new_tokens)
    return opts


def _ratio_metrics(series: str) -> MetricCollection:
    """train/ratio_mean_<series>, train/ratio_var_<series>, train/switch_freq_<series>."""
    return MetricCollection(
        {"ratio_mean": RatioMean(series), "ratio_var": RatioVariance(series), "switch_freq": SwitchFrequency()},
        postfix=f"_{series}",
        compute_groups=False,
    )


class KPOModule(pl.LightningModule):
    """Policy optimisation with Kalman-filtered importance ratios (or GRPO/GSPO/GMPO, same code path).

    Build it around any transformers causal LM and its tokenizer and hand it to a plain `lightning.Trainer`
    with a `PromptDataModule` (or any dataloader yielding `{"prompt": [...], "answer": [...]}` batches). It adds
    its own `RolloutCallback` unless you pass one to the Trainer.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        rollout: RolloutConfig | None = None,
        reward: RewardConfig | None = None,
        eval: EvalConfig | None = None,
        log: LogConfig | None = None,
        reward_fn: Callable[..., float] | None = None,
        engine: RolloutEngine | None = None,
        seed: int = 0,
        master_weights: bool = True,
    ) -> None:
        super().__init__()
        loss, optim, rollout = loss or LossConfig(), optim or OptimConfig(), rollout or RolloutConfig()
        reward, eval, log = reward or RewardConfig(), eval or EvalConfig(), log or LogConfig()  # None: the defaults
        check_loss_type(loss.type)
        self.policy = disable_dropout(policy)
        self.tokenizer = tokenizer
        self.loss_cfg, self.optim_cfg, self.rollout_cfg = loss, optim, rollout
        self.eval_cfg, self.log_cfg = eval, log
        self.reward_fn = reward_fn or reward_from_config(reward)
        self.engine: RolloutEngine = engine or HFGenerateEngine()
        self.automatic_optimization = False
        self.seed = seed
        self.master_weights = master_weights  # False (mode=eval): the weights are used in the dtype they came in
        self.loss_options = _loss_options(loss, rollout.max_new_tokens)
        # The filter of a KPO loss; for GRPO/GSPO/GMPO the diagnostic one (ratio variance and switch frequency,
        # filtered: what the filter would have done), from the configured Q (or tau), V, P0, else KPO-clipped's.
        self.diag_kalman = kalman_options(loss, rollout.max_new_tokens)

        # Reference snapshot for the KL term: with LoRA it is the base model (adapter disabled), no copy;
        # otherwise a frozen copy, kept out of state_dict (rebuilt from the model source on resume).
        self._reference: list[torch.nn.Module] = []
        if loss.beta > 0 and not hasattr(policy, "disable_adapter"):
            self._reference.append(copy.deepcopy(policy).eval().requires_grad_(False))

        # Ratio diagnostics over the off-policy tokens of a rollout step, synced over processes when logged.
        self.ratio_metrics_raw = _ratio_metrics("raw")
        self.ratio_metrics_filtered = _ratio_metrics("filtered")
        self.rollout_step = 0  # rollout steps done (the x axis of every curve)
        self.warmup_steps: int | None = None  # optimizer steps of LR warm-up, set by configure_optimizers
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._val_rewards: list[Tensor] = []
        self._val_kept: list[Tensor] = []  # per validation prompt: not a filler row
        self.last_val_summary: dict[str, float] = {}  # the last validation's summary, over all processes
        self.last_logs: dict[str, float] = {}

    # ----------------------------------------------------------------- Lightning wiring
    @classmethod
    def from_config(
        cls,
        policy: torch.nn.Module,
        tokenizer,
        cfg: Config,
        reward_fn: Callable[..., float] | None = None,
        master_weights: bool = True,
    ) -> KPOModule:
        """The module a whole run config describes (its loss, optim, rollout, reward, eval, log sections and seed);
        `master_weights=False` for evaluation only (see `configure_model`)."""
        return cls(
            policy,
            tokenizer,
            loss=cfg.loss,
            optim=cfg.optim,
            rollout=cfg.rollout,
            reward=cfg.reward,
            eval=cfg.eval,
            log=cfg.log,
            reward_fn=reward_fn,
            seed=cfg.seed,
            master_weights=master_weights,
        )

    def configure_callbacks(self):
        user_has_one = self._trainer is not None and any(
            isinstance(cb, RolloutCallback) for cb in self.trainer.callbacks
        )
        return [] if user_has_one else [RolloutCallback()]

    def configure_model(self) -> None:
        """float32 master weights under 32-true and bf16-mixed (a policy given in bfloat16 is converted, saying
        so: AdamW updates at small learning rates round away in bfloat16 weights; not with `master_weights=False`,
        the evaluation job's module, which uses `model.dtype` as loaded); under `trainer.strategy=fsdp`,
        shard the policy and the KL reference (FSDP2 `fully_shard`, kpo_lightning/training/strategies.py). Idempotent:
        Lightning calls it before every fit and validate."""
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        to_float32 = self.master_weights and weight_dtype(self.trainer.precision) == torch.float32
        if to_float32 and not is_sharded(self.policy):
            low = sorted({str(p.dtype) for p in self.policy.parameters() if p.is_floating_point()} - {"torch.float32"})
            if low:
                if self.global_rank == 0:
                    print(
                        f"[kpo] the policy's weights are {', '.join(low)} under precision={self.trainer.precision}: "
                        "converted to float32 master weights (bf16-true trains bfloat16 weights)",
                        flush=True,
                    )
                self.policy.float()
                for ref in self._reference:
                    ref.float()
        sharding = isinstance(strategy, FSDPStrategy)
        for ref in self._reference:
            if not is_sharded(ref):  # frozen: stored in the dtype it computes in (bfloat16 under bf16-mixed)
                store_reference_in_compute_dtype(ref, str(self.trainer.precision), sharded=sharding)
        if sharding:
            strategy.shard(self.policy)
            for ref in self._reference:
                strategy.shard(ref, frozen=True)

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        decay = set(decay_parameter_names(self.policy))
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": self.optim_cfg.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},  # biases, norms
        ]
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in params)
        opt = torch.optim.AdamW(groups, lr=self.optim_cfg.lr, betas=tuple(self.optim_cfg.betas), fused=fused)
        if self.warmup_steps is None:  # fixed when the run starts; a resumed run keeps it (see on_load_checkpoint)
            total = self.optimizer_steps_per_rollout * max(1, int(min(self.trainer.estimated_stepping_batches, 1e9)))
            self.warmup_steps = math.ceil(self.optim_cfg.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self._lr_factor(s))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def _lr_factor(self, optimizer_step: int) -> float:
        """Linear warm-up over `warmup_steps` optimizer steps, then constant (read at each step, so a value restored
        from a checkpoint after the scheduler was built still applies)."""
        return min(1.0, (optimizer_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.optim_cfg.num_minibatches * self.optim_cfg.epochs_per_rollout

    def on_fit_start(self) -> None:
        if self.loss_cfg.type in KPO_LOSSES and self.global_rank == 0:
            self._print_filter_setting()
        self.policy.train()  # gradient checkpointing only acts in train mode; dropout is off (see disable_dropout)
        # The reference follows the policy: same device, same sharding (configure_model), the same autocast (its
        # forward runs inside training_step) and bf16-true's bfloat16 weights (Lightning converts the policy only);
        # under bf16-mixed it keeps the bfloat16 weights configure_model stored it in (no float32 master copy).
        for ref in self._reference:
            ref.to(device=self.device)
            if self.trainer.precision == "bf16-true":
                ref.to(dtype=torch.bfloat16)

    def on_train_start(self) -> None:
        """A resumed run trains at this config's `optim.lr`: the restored optimizer and scheduler carry the saved
        one (a fresh run is unchanged: the same values are set again)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [self.optim_cfg.lr] * len(scheduler.base_lrs)
            for group in scheduler.optimizer.param_groups:
                group["lr"] = self.optim_cfg.lr * self._lr_factor(scheduler.last_epoch)

    def _print_filter_setting(self) -> None:
        """One line with the filter's Q/V and tau at max_new_tokens, and the warning when that tau is < 1."""
        kal, length = self.diag_kalman, self.rollout_cfg.max_new_tokens
        cfg = self.loss_cfg
        how = (
            f"loss.kalman_q={cfg.kalman_q:g}"
            if cfg.kalman_q is not None
            else f"tau {cfg.kalman_tau if cfg.kalman_tau is not None else DEFAULT_KALMAN_TAU:g}"
            + f"{' (the default)' if cfg.kalman_tau is None else ''} at L = {cfg.kalman_ref_length or length}"
        )
        print(
            f"[kpo] {cfg.type} filter: Q/V = {kal['kalman_q'] / kal['kalman_v']:.4g} ({how}); tau at "
            f"max_new_tokens {length}: {tau_at(length, kal['kalman_q'], kal['kalman_v']):.3g}",
            flush=True,
        )
        warning = short_filter_warning(cfg.type, kal, length)
        if warning:
            print(warning, flush=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kpo"] = {
            "rollout_step": self.rollout_step,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "warmup_steps": self.warmup_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("kpo", {})
        self.rollout_step = state.get("rollout_step", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        if state.get("warmup_steps") is not None:  # older checkpoints: recomputed from the new length
            self.warmup_steps = state["warmup_steps"]

    def rollout_inputs(self) -> RolloutInputs:
        """What `RolloutCallback` samples this step's rollout with (its whole view of this module)."""
        return RolloutInputs(
            engine=self.engine,
            policy=self.policy,
            tokenizer=self.tokenizer,
            reward_fn=self.reward_fn,
            params=SamplingParams.for_training(self.rollout_cfg),
            advantage_estimator=self.loss_cfg.advantage,
            seed=self.seed,
            global_rank=self.global_rank,
            rollout_step=self.rollout_step,
        )

    # ----------------------------------------------------------------- log-probs
    def sampling_params(self, rollout: Rollout) -> SamplingParams:
        """What `rollout` was sampled with (it records it; else the training settings RolloutCallback uses): the
        one source of the temperature and group size the loss assumes."""
        params = rollout.params if rollout.params is not None else SamplingParams.for_training(self.rollout_cfg)
        if not params.temperature > 0:
            raise UserInputError(
                f"a training rollout was sampled at temperature={params.temperature!r}: training "
                "log-probs need a temperature > 0 (greedy decoding is for evaluation only)"
            )
        return params

    def sequence_logprobs(
        self,
        model,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        with_entropy: bool = False,
        temperature: float | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropy) of the response tokens under `model`, at the sampling `temperature`
        (default: the configured training temperature).

        Position ids follow the attention mask, as in generation, so left padding does not shift positions.
        Only the response positions go through the LM head (see `kpo_lightning.algorithms.sequence_logprobs`).
        """
        temperature = self.rollout_cfg.temperature if temperature is None else temperature
        return sequence_logprobs(
            model, input_ids, attention_mask, prompt_length, temperature=temperature, with_entropy=with_entropy
        )

    def _micro_batches(self, rows: Tensor, seq_len: int) -> list[Tensor]:
        """Split rows so each forward/backward holds at most `micro_batch_size` rows and
        `max_tokens_per_micro_batch` tokens (rows x padded length), so long responses fit in memory."""
        size = self.optim_cfg.micro_batch_size or max(len(rows), 1)
        if self.optim_cfg.max_tokens_per_micro_batch > 0:
            size = min(size, max(1, self.optim_cfg.max_tokens_per_micro_batch // seq_len))
        if is_sharded(self.policy) and self.trainer.world_size > 1:
            # Every FSDP forward is a collective: all processes run the same number of micro-batches (the most any
            # needs; their padded lengths differ), each process's rows split evenly among them.
            count = torch.tensor(float(-(-len(rows) // size)), dtype=torch.float32, device=self.device)
            count = int(self.trainer.strategy.reduce(count, reduce_op="max").item())
            return list(torch.tensor_split(rows, count)) if count > 0 else []
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    @torch.no_grad()
    def _old_logprobs(self, rollout: Rollout, first_row: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """pi_old log-probs and entropy of rows `first_row..` (the rows before it are the first mini-batch, which
        is on-policy: its training forward supplies them), and reference log-probs of all rows when beta > 0."""
        gen = rollout.generation
        temperature = self.sampling_params(rollout).temperature
        n, width = gen.response_mask.shape
        # float32 explicitly: under bf16-true Lightning makes bfloat16 the default dtype inside training_step.
        f32 = dict(dtype=torch.float32, device=gen.input_ids.device)
        old = torch.zeros(n, width, **f32)
        ent = torch.zeros(n, width, **f32)
        ref = torch.zeros(n, width, **f32) if self.loss_cfg.beta > 0 else None
        all_rows = torch.arange(n, device=gen.input_ids.device)
        for rows in self._micro_batches(all_rows[first_row:], gen.input_ids.shape[1]):
            old[rows], ent[rows] = self.sequence_logprobs(
                self.policy,
                gen.input_ids[rows],
                gen.attention_mask[rows],
                gen.prompt_length,
                with_entropy=True,
                temperature=temperature,
            )
        if ref is not None:
            ctx = self.policy.disable_adapter() if not self._reference else nullcontext()
            ref_model = self._reference[0] if self._reference else self.policy
            with ctx:
                for rows in self._micro_batches(all_rows, gen.input_ids.shape[1]):
                    ref[rows] = self.sequence_logprobs(
                        ref_model,
                        gen.input_ids[rows],
                        gen.attention_mask[rows],
                        gen.prompt_length,
                        temperature=temperature,
                    )[0]
        return old, ent, ref

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One rollout step: pi_old (and reference) log-probs, then for each epoch and mini-batch the micro-batch
        losses and backwards, then one optimizer step; logging is `_log_step`'s."""
        rollout: Rollout | None = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            raise RuntimeError("the batch has no rollout: add kpo_lightning.RolloutCallback to the Trainer's callbacks")
        step_start = time.perf_counter()
        gen = rollout.generation
        device = gen.input_ids.device
        mask = gen.response_mask
        advantages = rollout.advantages.to(device)

        params = self.sampling_params(rollout)  # temperature and group size as sampled, whoever sampled
        n_groups = gen.input_ids.shape[0] // params.num_samples
        if n_groups % self.optim_cfg.num_minibatches:
            raise UserInputError(
                f"optim.num_minibatches={self.optim_cfg.num_minibatches} does not divide the {n_groups} prompts this "
                "process holds per rollout (data.prompts_per_step / processes): groups are never split"
            )
        rows_per_mb = n_groups // self.optim_cfg.num_minibatches * params.num_samples
        old_logp, entropy, ref_logp = self._old_logprobs(rollout, first_row=rows_per_mb)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        logs = StepLogs()
        last_offpolicy: tuple[Tensor, Tensor, Tensor] | None = None

        for epoch in range(self.optim_cfg.epochs_per_rollout):
            for mb in range(self.optim_cfg.num_minibatches):
                mb_rows = torch.arange(mb * rows_per_mb, (mb + 1) * rows_per_mb, device=device)
                off_policy = epoch > 0 or mb > 0
                normalizer = self._loss_normalizer(mask[mb_rows])
                loss_total = torch.zeros((), dtype=torch.float32, device=device)  # float32 also under bf16-true
                micro_batches = self._micro_batches(mb_rows, gen.input_ids.shape[1])
                for i, rows in enumerate(micro_batches):
                    # Under DDP, all-reduce gradients once per optimizer step, on the last micro-batch.
                    no_sync = getattr(self.trainer.model, "no_sync", None)
                    sync_ctx = no_sync() if no_sync is not None and i < len(micro_batches) - 1 else nullcontext()
                    with sync_ctx:
                        loss, metrics, logp = self._micro_batch_loss(
                            gen,
                            rows,
                            old_logp,
                            entropy,
                            advantages,
                            mask,
                            ref_logp,
                            normalizer,
                            on_policy=not off_policy,
                            temperature=params.temperature,
                        )
                        self.manual_backward(loss)
                    loss_total += loss.detach()
                    logs.add_micro_batch(metrics)
                    if off_policy:
                        last_offpolicy = self._update_ratio_metrics(logp.detach() - old_logp[rows], mask[rows])
                logs.add_optimizer_step(loss_total, self._step_or_skip(opt, sched, loss_total))

        self.rollout_step += 1
        self._log_step(logs, rollout, entropy, step_start, last_offpolicy)

    def _loss_normalizer(self, mask: Tensor) -> float:
        """The count a mini-batch's loss divides by: its whole count summed over processes, over the world size.
        DDP and FSDP average gradients, so each process divides by (global count / world size) to get the
        global-batch gradient."""
        world = self.trainer.world_size
        norm = torch.tensor(
            float(aggregation_normalizer(self.loss_cfg.agg, mask)), dtype=torch.float32, device=mask.device
        )
        if world > 1:
            norm = self.trainer.strategy.reduce(norm, reduce_op="sum")
        return norm.item() / world

    def _log_step(
        self,
        logs: StepLogs,
        rollout: Rollout,
        entropy: Tensor,
        step_start: float,
        offpolicy: tuple[Tensor, Tensor, Tensor] | None,
    ) -> None:
        """Log the rollout step: one point per `train/*` name, combined over processes (see `step_logs`)."""
        update_s = time.perf_counter() - step_start
        gen = rollout.generation
        strategy = self.trainer.strategy
        reduce = (lambda t, op: strategy.reduce(t, reduce_op=op)) if self.trainer.world_size > 1 else None
        values = logs.finish(
            rollout.stats,
            gen.input_ids.shape[0],
            entropy,
            gen.response_mask,
            step_seconds=update_s + rollout.stats["time_generate_s"] + rollout.stats["time_score_s"],
            update_seconds=update_s,
            same={
                "lr": self.lr_schedulers().get_last_lr()[0],
                "skipped_steps": float(self.skipped_steps),
                "skipped_long_prompts": float(getattr(self.trainer.datamodule, "num_skipped_long", 0) or 0),
            },
            ratio_diagnostics=(self.ratio_metrics_raw, self.ratio_metrics_filtered),
            kalman=self.diag_kalman if self.loss_cfg.type in KPO_LOSSES else None,
            reduce=reduce,
        )
        batch_size = gen.input_ids.shape[0]
        self.log("reward", values["train/reward"], prog_bar=True, logger=False, batch_size=batch_size)
        self.log("train/reward", values["train/reward"], logger=False, batch_size=batch_size)
        self.last_logs = values  # for callbacks and tests
        self._log_metrics(values)
        self._log_text_and_figure(rollout, offpolicy)

    def _micro_batch_loss(
        self,
        gen,
        rows: Tensor,
        old_logp: Tensor,
        entropy: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logp: Tensor | None,
        normalizer: float,
        on_policy: bool,
        temperature: float | None = None,
    ) -> tuple[Tensor, dict, Tensor]:
        """Loss of one micro-batch. On the first (on-policy) mini-batch pi_old is the current policy, so its
        log-probs and entropy are taken from this forward instead of a separate no-grad pass."""
        logp, ent = self.sequence_logprobs(
            self.policy,
            gen.input_ids[rows],
            gen.attention_mask[rows],
            gen.prompt_length,
            with_entropy=on_policy,
            temperature=temperature,
        )
        if on_policy:
            old_logp[rows] = logp.detach()
            entropy[rows] = ent
        opts = dict(self.loss_options, normalizer=normalizer)
        if ref_logp is not None:
            opts.update(ref_logp=ref_logp[rows], beta=self.loss_cfg.beta, kl_estimator=self.loss_cfg.kl_estimator)
        loss, metrics = compute_policy_loss(
            self.loss_cfg.type, logp, old_logp[rows], advantages[rows], mask[rows], **opts
        )
        return loss, metrics, logp

    def _update_ratio_metrics(self, raw: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw and filtered ratio diagnostics of an off-policy micro-batch (the filter is recomputed here so
        that GRPO/GSPO/GMPO runs show what it would have done)."""
        raw = raw.float()
        kal = self.diag_kalman
        filtered = causal_kalman_filter(raw, mask, kal["kalman_q"], kal["kalman_v"], kal["kalman_p0"])
        self.ratio_metrics_raw.update(raw, mask)
        self.ratio_metrics_filtered.update(filtered, mask)
        return raw, filtered, mask

    def _step_or_skip(self, opt, sched, loss: Tensor) -> float:
        """Clip and step, or skip the step (and count it) when the loss or gradient norm is not finite.

        Both are decided on global values, the same on every process: the norm is the whole model's (DDP
        gradients are already all-reduced; FSDP's DTensor gradients give the norm over all shards), and a
        non-finite loss on any process skips the step everywhere (else the processes' weights would drift apart).
        """
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the global norm, replicated
            grad_norm = grad_norm.full_tensor()
        bad = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.float())]).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.to(self.device), reduce_op="sum")
        bad_loss, bad_norm = bool(bad[0] > 0), bool(bad[1] > 0)
        finite = not (bad_loss or bad_norm)
        if finite:
            opt.step()
            sched.step()
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            what = "loss" if bad_loss else "gradient norm"
            print(
                f"[kpo] rollout step {self.rollout_step}: non-finite {what}, optimizer step skipped "
                f"({self.consecutive_skips} in a row)",
                flush=True,
            )
            if self.consecutive_skips >= self.optim_cfg.max_skipped_steps:
                opt.zero_grad(set_to_none=True)
                raise NonFiniteTrainingError(
                    f"{self.consecutive_skips} optimizer steps in a row had a non-finite {what} "
                    f"(optim.max_skipped_steps={self.optim_cfg.max_skipped_steps}); lower optim.lr or check the model"
                )
        opt.zero_grad(set_to_none=True)
        return float(grad_norm) if not bad_norm else float("nan")

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Sample and score `eval.k` answers to this process's validation prompts (the data module gives each
        process its own share; filler rows that even the shares out are flagged in the batch's "padding")."""
        params = SamplingParams.for_eval(self.rollout_cfg, self.eval_cfg)
        # Validation samples from its own seeded RNG: the same prompts get the same draws at every evaluation,
        # and training's RNG stream is untouched (so a resumed run samples exactly what the original would).
        with (
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            full_weights_for_generation(self.trainer, self.policy),
        ):
            torch.manual_seed(self.seed * 1_000_003 + batch_idx * 7919 + self.global_rank)
            rewards = evaluate_batch(
                self.engine, self.policy, self.tokenizer, batch["prompt"], batch["answer"], params, self.reward_fn
            )
        padding = batch.get(VAL_PADDING) or [False] * len(batch["prompt"])
        self._val_rewards.append(rewards.to(self.device))
        # uint8, not bool: gloo's all_gather takes no bool tensors
        self._val_kept.append(1 - torch.tensor(padding, dtype=torch.uint8, device=self.device))

    def on_validation_epoch_end(self) -> None:
        """Gather every process's rewards once, drop the filler rows, log avg@k and pass@k over all prompts."""
        if not self._val_rewards:
            return
        from kpo_lightning.rollout.evaluation import summarize

        rewards, kept = torch.cat(self._val_rewards), torch.cat(self._val_kept)  # (prompts here, k), (prompts here,)
        self._val_rewards, self._val_kept = [], []
        if self.trainer.world_size > 1:
            rewards = self.all_gather(rewards).reshape(-1, rewards.shape[-1])
            kept = self.all_gather(kept).reshape(-1)
        summary = summarize(rewards[kept.bool()], self.eval_cfg.k)
        self.last_val_summary = summary
        self.log("val/accuracy", summary["accuracy"], prog_bar=True, logger=False, sync_dist=False)
        self._log_metrics({f"val/{k}": v for k, v in summary.items()})

    # ----------------------------------------------------------------- logging
    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """One point per rollout step, whatever the number of optimizer steps inside it."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.rollout_step)

    def _tensorboard(self):
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_figure") and self.global_rank == 0:
                return exp
        return None

    def _due(self, every: int) -> bool:
        """Log this rollout step? Every `every` steps and at the first one; never when `every` is 0."""
        return every > 0 and (self.rollout_step % every == 0 or self.rollout_step == 1)

    def _log_text_and_figure(self, rollout: Rollout, offpolicy: tuple[Tensor, Tensor, Tensor] | None) -> None:
        tb = self._tensorboard()
        if tb is None:
            return
        if self._due(self.log_cfg.samples_every_n_steps):
            rows = []
            for i in range(0, len(rollout.prompts), max(1, self.sampling_params(rollout).num_samples)):
                rows.append(
                    f"| {rollout.prompts[i]!r} | {rollout.generation.completions[i]!r} | "
                    f"{rollout.answers[i]!r} | {rollout.rewards[i].item():.2f} |"
                )
            table = "| prompt | completion | answer | reward |\n|---|---|---|---|\n" + "\n".join(rows[:8])
            tb.add_text("samples", table, self.rollout_step)
        if offpolicy is not None and self._due(self.log_cfg.ratio_plot_every_n_steps):
            from kpo_lightning.training.plots import ratio_figure

            raw, filtered, mask = offpolicy
            row = int(mask.sum(dim=1).argmax())
            fig = ratio_figure(raw[row][mask[row]], filtered[row][mask[row]])
            tb.add_figure("ratios/raw_vs_filtered", fig, self.rollout_step)
