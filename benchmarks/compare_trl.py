"""Wall time and throughput of one RL fine-tuning job run through kpo-lightning and through TRL's GRPOTrainer.

Both frameworks get, in one process on this machine:
- the same tiny model and initial weights (the shipped `kpo_lightning/assets/tiny-arith`, or, when it is absent,
  a random Llama of the same shape over the character tokenizer), a fresh copy for every run;
- the same prompts: the built-in arithmetic stream, read through a `PromptDataModule` (TRL gets those prompts in
  the same order as a `datasets.Dataset`, not shuffled; the script checks that both trained on the same ones);
- the same group size G, max completion length L, sampling (temperature 1, no top-p/top-k), reward function
  (`kpo_lightning.rewards.scoring.math_reward_fn`, wrapped for TRL's batch signature), loss (GRPO: clipped token
  ratios, per-sequence token mean then mean over sequences, beta=0), AdamW hyper-parameters and gradient clipping;
- the same work per rollout step: P prompts x G samples generated with transformers' `generate`, then M optimizer
  steps on M disjoint mini-batches of P*G/M sequences, after one no-grad forward for the "old" log-probs (both
  frameworks do it when M > 1, since mini-batches 2..M are then off-policy; with M=1 TRL skips it and we do not).

Settings mapping (ours -> TRL GRPOConfig):
    data.prompts_per_step=P, rollout.num_generations=G -> num_generations=G, generation_batch_size=P*G (implied)
    optim.num_minibatches=M, micro_batch_size=0        -> steps_per_generation=M, per_device_train_batch_size=P*G/M,
                                                          gradient_accumulation_steps=1
    optim.epochs_per_rollout=1                          -> num_iterations=1
    rollout.max_new_tokens=L, temperature=1, top_p=1    -> max_completion_length=L, temperature=1, top_p=1, top_k=0
    loss.type=grpo, agg=seq-mean-token-mean, beta=0    -> loss_type="grpo", beta=0.0, epsilon=0.2
    loss.advantage=grpo (group mean / group std)       -> scale_rewards="group"
    optim lr, weight_decay=0.1, betas, grad_clip=1      -> learning_rate, weight_decay=0.1, adam_beta1/2,
                                                          max_grad_norm=1
    model.gradient_checkpointing=false                  -> gradient_checkpointing=False (TRL's default is True;
                                                          --trl-gradient-checkpointing keeps it)
    N rollout steps                                     -> max_steps = N*M
and for TRL: use_vllm=False, use_cpu=True, bf16=False, report_to=[], no eval, no saving, no logging in the run.
Each framework keeps its own optimizer implementation (TRL/transformers: fused AdamW; ours: torch AdamW).

How it is timed. The two runs go in lock step, each in its own thread: only one thread runs at any moment, and the
turn passes to the other framework at the end of every rollout step. So both see the same machine load, which
on a shared machine drifts far more between two runs than between two neighbouring steps. A framework's time is
the sum of its turns over the `--steps` timed rollout steps that follow `--warmup` untimed ones: from the end of
one rollout step to the end of the next, so it includes fetching prompts, generation, scoring, advantages, old
log-probs, the updates and the framework's own per-step overhead; model loading and trainer setup are not
included (printed separately). Tokens per second = completion tokens actually generated (up to and including
eos) / that time. The time is split into generation (tokenising, `generate`, decoding), scoring (reward calls),
old log-probs (the no-grad forward) and update (the rest: policy forward/backward, optimizer steps, overhead).
`--reps` repeats the pair, alternating which framework starts.

torch runs on `--threads` threads (default 1) in both: on a small shared machine, oversubscribed threads make
the tiny kernels of a tiny model many times slower and the timing meaningless.

Run (about a minute of CPU with the defaults, which are kpo_lightning/conf/default.yaml's P, G, L and M):

    pip install -e ".[bench]"
    python benchmarks/compare_trl.py
    python benchmarks/compare_trl.py --steps 20 --warmup 2 --prompts 8 --group 8 --max-new-tokens 12 --minibatches 4 \
        --reps 3                                               # the docs/benchmarks.md table: the defaults, written out
    python benchmarks/compare_trl.py --only ours --profile     # cProfile of the timed steps of one framework
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from machine import machine_line, spread  # benchmarks/machine.py (benchmarks/ is sys.path[0])

ASSET = Path(__file__).resolve().parents[1] / "kpo_lightning" / "assets" / "tiny-arith"
# The shipped tiny-arith architecture (scripts/make_tiny_model.py), used for the random stand-in.
TINY_ARITH_ARCH = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
OURS, TRL = "kpo-lightning", "TRL GRPOTrainer"
# GRPOTrainer methods wrapped to split TRL's time (private: checked at run time, written against trl 1.16)
TRL_INTERNALS = ("_generate", "_calculate_rewards", "_get_per_token_logps_and_entropies")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed rollout steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed rollout steps before them (>= 1)")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per rollout step")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=12, help="L: max completion tokens")
    p.add_argument("--minibatches", type=int, default=4, help="M: optimizer steps per rollout")
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions of the pair, alternating which one starts (3+ for a min-median-max spread)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads, for both frameworks")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model folder (default: the tiny-arith asset, else random)")
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="leave TRL's default gradient_checkpointing=True on (not like for like: ours is off)",
    )
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one framework (for profiling)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps and print the top functions")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (timing starts at the end of a warm-up step)")
    if args.steps < 1 or args.reps < 1:
        p.error("--steps and --reps must be >= 1")
    if args.prompts % args.minibatches:
        p.error("--prompts must be a multiple of --minibatches (whole groups in every mini-batch)")
    if args.group < 2:
        p.error("--group must be >= 2 (GRPO needs 2 samples per prompt)")
    return args


def load_model(path: str | None):
    """(model, tokenizer, description): the given folder, the tiny-arith asset, or a random stand-in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path else ASSET
    if folder.is_dir():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        name = str(folder.name)
    else:
        if path:
            raise SystemExit(f"--model {path}: not a folder")
        from kpo_lightning.models.char_tokenizer import build_char_tokenizer
        from kpo_lightning.models.tiny_models import build_tiny_random_model

        tokenizer = build_char_tokenizer()
        model = build_tiny_random_model(tokenizer, seed=0, **TINY_ARITH_ARCH)
        name = "random Llama shaped like tiny-arith (asset absent)"
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, f"{name}, {params / 1e6:.2f}M params, vocab {len(tokenizer)}"


def data_config(args):
    from kpo_lightning.config import DataConfig

    return DataConfig(source="arithmetic", prompts_per_step=args.prompts, val_size=8)


def prompt_batches(tokenizer, args) -> list[dict[str, list[str]]]:
    """The first rollout batches of the arithmetic stream, exactly as our training run will see them."""
    from kpo_lightning import PromptDataModule

    dm = PromptDataModule(data_config(args), tokenizer=tokenizer, seed=args.seed)
    dm.setup("fit")
    it = dm.train_batches()
    return [next(it) for _ in range(args.warmup + args.steps)]


# ------------------------------------------------------------------------------------------------ timing


class LockStep:
    """Lets one framework thread run at a time; the turn passes round at the end of every rollout step.

    `end_of_step` closes the thread's current turn (adding it to its timed total, or to its setup time), hands the
    turn on and blocks until it comes back. After its last step a thread closes its turn but keeps it until it has
    finished (so its teardown overlaps nothing), then leaves the rotation.
    """

    def __init__(self, names: list[str], profile=None, on_turn=None) -> None:
        self.on_turn = on_turn  # called at the start of every turn
        self.order = list(names)
        self.turn = self.order[0]
        self.active = set(self.order)
        self.cond = threading.Condition()
        self.resumed: dict[str, float] = {}
        self.profile = profile

    def _next(self, name: str) -> str:
        i = self.order.index(name)
        for k in range(1, len(self.order) + 1):
            cand = self.order[(i + k) % len(self.order)]
            if cand in self.active:
                return cand
        return name

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        if self.on_turn is not None:
            self.on_turn()
        self.resumed[name] = time.perf_counter()

    def close_turn(self, name: str, res: Result, timed: bool) -> None:
        """Add the turn that ends now to the run's timed total or to its setup time."""
        elapsed = time.perf_counter() - self.resumed[name]
        if timed:
            res.wall += elapsed
            res.turns.append(elapsed)
            if self.profile is not None:
                self.profile.disable()
        else:
            res.setup += elapsed

    def end_of_step(self, name: str, res: Result, timed: bool, start_timing: bool = False) -> None:
        self.close_turn(name, res, timed)
        with self.cond:
            self.turn = self._next(name)
            self.cond.notify_all()
        self.wait_turn(name)
        if self.profile is not None and (start_timing or (timed and res.steps_left > 0)):
            self.profile.enable()

    def leave(self, name: str) -> None:
        with self.cond:
            self.active.discard(name)
            if self.turn == name:
                self.turn = self._next(name)
            self.cond.notify_all()


class Result:
    """Totals over the timed rollout steps of one run."""

    def __init__(self, steps: int) -> None:
        self.wall = self.generate = self.score = self.old_logp = 0.0
        self.tokens = 0
        self.steps_left = steps
        self.turns: list[float] = []  # seconds of each timed rollout step
        self.setup = 0.0  # model copy, trainer construction and warm-up steps (its own turns only)
        self.reward: list[float] = []  # mean reward of each timed rollout
        self.prompts: list[list[str]] = []  # the distinct prompts of each timed rollout, in order

    @property
    def update(self) -> float:
        """Everything but generation, scoring and old log-probs: policy forward/backward, optimizer, overhead."""
        return self.wall - self.generate - self.score - self.old_logp


# ------------------------------------------------------------------------------------------------ ours


def run_ours(model, tokenizer, args, sync: LockStep, res: Result) -> None:
    import lightning.pytorch as pl

    from kpo_lightning import KPOModule, PromptDataModule
    from kpo_lightning.config import LossConfig, OptimConfig, RolloutConfig
    from kpo_lightning.rewards.scoring import math_reward_fn

    warm = args.warmup  # rollout steps (batch_idx 0..warm-1) before the timed ones

    class Turns(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timed = batch_idx >= warm
            if timed:
                stats = batch["rollout"].stats
                res.generate += stats["time_generate_s"]
                res.score += stats["time_score_s"]
                res.tokens += int(stats["generated_tokens"])
                res.reward.append(stats["reward"])
                res.prompts.append(list(batch["prompt"]))
                res.steps_left -= 1
            if res.steps_left > 0:
                sync.end_of_step(OURS, res, timed, start_timing=batch_idx == warm - 1)
            else:
                sync.close_turn(OURS, res, timed)

    module = KPOModule(
        model,
        tokenizer,
        loss=LossConfig(type="grpo", beta=0.0),
        optim=OptimConfig(lr=args.lr, num_minibatches=args.minibatches, warmup_ratio=0.0),
        rollout=RolloutConfig(num_generations=args.group, max_new_tokens=args.max_new_tokens),
        reward_fn=math_reward_fn,
        seed=args.seed,
    )
    old_logprobs = module._old_logprobs

    def timed_old_logprobs(*a, **kw):
        t = time.perf_counter()
        out = old_logprobs(*a, **kw)
        if module.rollout_step >= warm:  # rollout_step = index of the rollout being trained on
            res.old_logp += time.perf_counter() - t
        return out

    module._old_logprobs = timed_old_logprobs
    data = PromptDataModule(data_config(args), tokenizer=tokenizer, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=args.warmup + args.steps,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Turns()],
    )
    torch.manual_seed(args.seed)
    trainer.fit(module, datamodule=data)


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(model, tokenizer, args, sync: LockStep, res: Result, batches: list[dict[str, list[str]]]) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from kpo_lightning.rewards.scoring import math_reward_fn

    m = args.minibatches
    warm = args.warmup * m  # optimizer steps before the timed ones; one rollout step = m optimizer steps
    n_rows = args.prompts * args.group

    def boxed_reward(prompts, completions, answer, **kwargs) -> list[float]:
        """TRL's batch signature around the per-sample reward our run uses."""
        return [math_reward_fn(prompt=p, completion=c, answer=a) for p, c, a in zip(prompts, completions, answer)]

    dataset = Dataset.from_dict(
        {
            "prompt": [p for b in batches for p in b["prompt"]],
            "answer": [a for b in batches for a in b["answer"]],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=args.seed,
            max_steps=(args.warmup + args.steps) * m,
            num_generations=args.group,
            max_completion_length=args.max_new_tokens,
            per_device_train_batch_size=n_rows // m,
            gradient_accumulation_steps=1,
            steps_per_generation=m,
            num_iterations=1,
            shuffle_dataset=False,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            loss_type="grpo",
            beta=0.0,
            epsilon=0.2,
            scale_rewards="group",
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.999,
            max_grad_norm=1.0,
            gradient_checkpointing=args.trl_gradient_checkpointing,
            use_vllm=False,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_completions=False,
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=[boxed_reward], args=config, train_dataset=dataset, processing_class=tokenizer
        )
        missing = [a for a in TRL_INTERNALS if not hasattr(trainer, a)]
        if missing:
            raise SystemExit(
                f"this TRL has no GRPOTrainer.{', '.join(missing)}: the timing hooks were written for "
                f"trl 1.16 (pip install -e '.[bench]')"
            )

        def timed() -> bool:  # inside a timed rollout step (global_step = optimizer steps done so far)
            return trainer.state.global_step >= warm

        generate, calculate_rewards = trainer._generate, trainer._calculate_rewards
        logps = trainer._get_per_token_logps_and_entropies

        def timed_generate(prompts, *a, **kw):
            t = time.perf_counter()
            out_ = generate(prompts, *a, **kw)
            if timed():
                res.generate += time.perf_counter() - t
                res.tokens += sum(len(ids) for ids in out_[1])  # completion ids, eos included
                res.prompts.append(list(dict.fromkeys(prompts)))
            return out_

        def timed_rewards(*a, **kw):
            t = time.perf_counter()
            out_ = calculate_rewards(*a, **kw)
            if timed():
                res.score += time.perf_counter() - t
                res.reward.append(float(out_.sum(dim=1).mean()))
            return out_

        def timed_logps(*a, **kw):
            t = time.perf_counter()
            out_ = logps(*a, **kw)
            if timed() and not torch.is_grad_enabled():  # the no-grad pass: old log-probs
                res.old_logp += time.perf_counter() - t
            return out_

        trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
        trainer._get_per_token_logps_and_entropies = timed_logps

        class Turns(TrainerCallback):
            def on_step_end(self, _args, state, control, **kw):
                if state.global_step % m:
                    return  # mid-rollout optimizer step
                timed_step = state.global_step > warm
                if timed_step:
                    res.steps_left -= 1
                if res.steps_left > 0:
                    sync.end_of_step(TRL, res, timed_step, start_timing=state.global_step == warm)
                else:
                    sync.close_turn(TRL, res, timed_step)

        trainer.add_callback(Turns())
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
        torch.manual_seed(args.seed)
        trainer.train()


# ------------------------------------------------------------------------------------------------ main


def quiet() -> None:
    """Silence both frameworks' banners and warnings (Lightning sets its log level on import: import it first)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning.pytorch  # noqa: F401
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


def run_pair(names: list[str], base, tokenizer, args, batches, profile) -> dict[str, Result]:
    """Both frameworks in lock step (see the module docstring); returns their timed totals."""
    from kpo_lightning.rewards import math_reward

    # The math reward caches (reference, answer) verdicts process-wide: emptied at every turn, so that neither
    # framework scores faster thanks to the other's answers.
    sync = LockStep(names, profile, on_turn=math_reward._CACHE.clear)
    results = {name: Result(args.steps) for name in names}
    errors: dict[str, BaseException] = {}

    def worker(name: str) -> None:
        try:
            sync.wait_turn(name)
            model = copy.deepcopy(base)
            if name == OURS:
                run_ours(model, tokenizer, args, sync, results[name])
            else:
                run_trl(model, tokenizer, args, sync, results[name], batches)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors[name] = e
        finally:
            sync.leave(name)

    threads = [threading.Thread(target=worker, args=(name,), name=name) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, e in errors.items():
        raise RuntimeError(f"the {name} run failed: {e!r}") from e
    return results


def main() -> None:
    args = parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None

    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
    from kpo_lightning.rewards.scoring import math_reward

    math_reward("\\boxed{x}", "1")  # starts the math-verify worker (seconds of imports) before any timing
    base, tokenizer, described = load_model(args.model)
    batches = prompt_batches(tokenizer, args)
    n_rows = args.prompts * args.group
    print(machine_line())
    print(
        f"model: {described}; trl {trl.__version__}, torch {torch.__version__}, {args.threads} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"per rollout step: P={args.prompts} prompts x G={args.group} = {n_rows} samples of <= "
        f"{args.max_new_tokens} tokens, then M={args.minibatches} optimizer steps of {n_rows // args.minibatches} "
        f"samples; {args.warmup} warm-up + {args.steps} timed rollout steps per run, {args.reps} rep(s)"
    )

    names = [OURS, TRL] if args.only is None else [{"ours": OURS, "trl": TRL}[args.only]]
    runs: dict[str, list[Result]] = {name: [] for name in names}
    for rep in range(args.reps):
        pair = run_pair(names if rep % 2 == 0 else names[::-1], base, tokenizer, args, batches, profile)
        torch.set_num_threads(args.threads)  # in case a framework changed it
        for name in names:
            res = pair[name]
            runs[name].append(res)
            print(
                f"  rep {rep + 1} {name:16s} {res.wall:6.2f} s, {res.tokens / res.wall:6.0f} tok/s (gen "
                f"{res.generate:.2f}, score {res.score:.2f}, old logp {res.old_logp:.2f}, update {res.update:.2f}; "
                f"setup+warm-up {res.setup:.2f} s; mean reward {statistics.fmean(res.reward):.3f})",
                flush=True,
            )

    expected = [b["prompt"] for b in batches[args.warmup :]]
    for name in names:
        if any(r.prompts != expected for r in runs[name]):
            raise SystemExit(f"{name} did not train on the expected prompts: the comparison is not like for like")

    print(f"\ntotals over {args.reps} rep(s) x {args.steps} timed rollout steps (same prompts in both: checked)")
    cols = ("time s", "tokens", "tok/s", "gen s", "score s", "oldlogp s", "update s", "ms/step", "median")
    print(f"{'framework':16s} " + " ".join(f"{c:>9s}" for c in cols))
    tps = {}
    for name in names:
        results = runs[name]
        wall = sum(r.wall for r in results)
        tokens = sum(r.tokens for r in results)
        parts = [sum(getattr(r, k) for r in results) for k in ("generate", "score", "old_logp", "update")]
        tps[name] = tokens / wall
        median = statistics.median(t for r in results for t in r.turns)
        values = (
            f"{wall:.2f}",
            str(tokens),
            f"{tps[name]:.0f}",
            *(f"{v:.2f}" for v in parts),
            f"{1e3 * wall / (args.steps * len(results)):.0f}",
            f"{1e3 * median:.0f}",
        )
        print(f"{name:16s} " + " ".join(f"{v:>9s}" for v in values))
        labels = ("generation", "scoring", "old log-probs", "update (fwd/bwd, optimizer, overhead)")
        print(f"{'':16s}  " + ", ".join(f"{k} {v / wall:.0%}" for k, v in zip(labels, parts)))
    if len(names) == 2:
        ratio = tps[OURS] / tps[TRL]
        per_rep = [(o.tokens / o.wall) / (t.tokens / t.wall) for o, t in zip(runs[OURS], runs[TRL])]
        print(
            f"\ntokens/s {OURS} / TRL: {ratio:.2f}x (per rep: {', '.join(f'{r:.2f}' for r in per_rep)}); "
            f"{'faster than' if ratio >= 1 else 'SLOWER than'} TRL (target: 1.5x)"
        )
        for name in names:
            print(f"tokens/s {name} per rep, min-median-max: {spread([r.tokens / r.wall for r in runs[name]], '.0f')}")
        print(f"tokens/s {OURS} / TRL per rep, min-median-max: {spread(per_rep)}")
    print(machine_line())  # the load average at the end, too
    if profile is not None:
        import pstats

        for key in ("tottime", "cumulative"):
            print(f"\n--- cProfile of the timed rollout steps, top 40 by {key} ---")
            pstats.Stats(profile).sort_stats(key).print_stats(40)


if __name__ == "__main__":
    main()
