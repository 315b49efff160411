"""GPU check of the paper recipe: `preset=paper` on a randomly initialised Qwen3 with the real 151,936-token
vocabulary (config built in code), two rollout steps per variant, each printing loss, gradient norm, tokens/s, the
measured peak memory and `run.py --plan`'s prediction for the same run.

    bash scripts/gpu_check.sh            # on a machine with CUDA GPUs (no edits, no downloads)
    bash scripts/gpu_check.sh --cpu      # the same variants on CPU processes (gloo): a smoke test of the path

The model: Qwen3-0.6B's shapes on a GPU (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate
3072, tied embeddings), a 2-layer hidden-64 Qwen3 with `--cpu`; both with Qwen3's vocabulary, so the chunked
151,936-column log-prob path and a full-size LM head run. The tokenizer is the project's character tokenizer
filled up to 151,936 ids with tokens "<i>" (encode never produces them; they decode to their text, digits
included, so the digit-share reward varies within groups and the gradient is not zero).
Variants: 1 GPU (bf16-mixed, gradient checkpointing: the preset as it stands), 1 GPU without checkpointing,
1 GPU with LoRA, FSDP on 1 GPU, and on machines with 2+ GPUs FSDP on 2 GPUs, with and without LoRA. The data is
the built-in arithmetic task (the machine may be offline) and the reward the share of digits in the completion
(a random model never answers right: the math reward would give a zero gradient); everything else is the paper
preset, with shorter responses (--max-new-tokens, default 1024) so the check takes minutes.

The measured peak is `torch.cuda.max_memory_allocated()` of rank 0 over the whole run, never reset: the validation
before training, the rollouts' `generate` (with `rollout.generation_batch_size=auto`) and the updates. Exit 1 when a
variant fails, has a non-finite loss or gradient norm or a skipped optimizer step, or measures a peak more than
PEAK_MARGIN above the plan. On a machine without CUDA (and without --cpu) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN3_VOCAB = 151_936
PEAK_MARGIN = 0.10  # a measured peak above the plan by more than this share fails the check

# name: (processes, strategy, extra overrides)
VARIANTS = {
    "1gpu-bf16-mixed-checkpointing": (1, "auto", []),
    "1gpu-no-checkpointing": (1, "auto", ["model.gradient_checkpointing=false"]),
    "1gpu-lora": (1, "auto", ["model.lora.r=16"]),
    "1gpu-fsdp": (1, "fsdp", []),
    "2gpu-fsdp": (2, "fsdp", []),
    "2gpu-fsdp-lora": (2, "fsdp", ["model.lora.r=16"]),
}


def tiny_qwen3(folder: Path, cpu: bool) -> Path:
    """A random Qwen3 with Qwen3's vocabulary (tied embeddings, q/k norms, GQA): Qwen3-0.6B's shapes on a GPU, a
    2-layer hidden-64 one with --cpu; the character tokenizer filled up to that vocabulary; saved as a folder."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from kpo_lightning.models.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(model_max_length=8192, vocab_size=QWEN3_VOCAB)
    size = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        if cpu
        else dict(  # Qwen3-0.6B
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        )
    )
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **size,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def digit_share(prompt: str, completion: str, answer: str, **kwargs) -> float:
    """The check's reward: the share of digits in the completion. A random model never answers right, so the
    math reward would give zero advantages (and a zero gradient); this one varies within every group."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def overrides(variant: str, model: Path, out: Path, cpu: bool, max_new_tokens: int) -> list[str]:
    processes, strategy, extra = VARIANTS[variant]
    small = (
        [
            "data.prompts_per_step=4",
            "rollout.num_generations=4",
            "optim.num_minibatches=2",
            "optim.micro_batch_size=4",
            "data.val_size=4",
        ]
        if cpu
        else ["data.val_size=16"]
    )
    return [
        "preset=paper",
        f"model.name_or_path={model}",
        "data.source=arithmetic",
        "data.subset=null",
        "data.val_source=null",
        f"reward.fn={Path(__file__).resolve()}:digit_share",
        f"rollout.max_new_tokens={max_new_tokens}",
        "trainer.max_steps=2",
        "eval.every_n_steps=2",
        "eval.k=2",
        "checkpoint.every_n_steps=0",
        "checkpoint.keep_last=1",
        f"output_dir={out}",
        f"trainer.accelerator={'cpu' if cpu else 'gpu'}",
        f"trainer.devices={processes}",
        f"trainer.strategy={strategy}",
        *small,
        *extra,
    ]


def worker(args) -> int:
    """One variant, in this process (Lightning launches the other ranks by re-running this command)."""
    import lightning.pytorch as pl
    import torch

    import kpo_lightning.cli.train as train_main
    from kpo_lightning.algorithms.memory_plan import GIB, ParameterCounts, Shapes, plan_memory
    from kpo_lightning.cli.config_checks import check_config
    from kpo_lightning.cli.config_loading import load_config
    from kpo_lightning.cli.main import check_inputs
    from kpo_lightning.cli.plan import device_memory_bytes, process_count
    from kpo_lightning.models.memory import load_model_config, parameter_counts

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")

    class Report(pl.Callback):
        """One RESULT line per rollout step (rank 0); the peak is never reset, so it includes the validation
        before training and every generate so far."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not trainer.is_global_zero:
                return
            logs = pl_module.last_logs
            row = {
                "variant": args.variant,
                "step": pl_module.rollout_step,
                "loss": logs["train/loss"],
                "grad_norm": logs["train/grad_norm"],
                "skipped_steps": logs.get("train/skipped_steps", 0.0),
                "tokens_per_s": logs["train/tokens_per_second"],
                "peak_gib": peak_gib(),
                "reward": logs.get("train/reward"),
            }
            print("RESULT " + json.dumps(row), flush=True)

    build = train_main.build_trainer
    train_main.build_trainer = lambda cfg, callbacks, logger: build(cfg, [*callbacks, Report()], logger)
    cfg = load_config(overrides(args.variant, Path(args.model), Path(args.out), args.cpu, args.max_new_tokens))
    check_config(cfg)
    # run.py --plan's prediction for this run, on this device (its free memory before anything is allocated).
    model_config = load_model_config(cfg.model)
    processes = process_count(cfg)
    device_bytes, _ = device_memory_bytes(cfg, None, processes)
    counts = ParameterCounts(**parameter_counts(model_config, cfg.model))
    plan = plan_memory(cfg, Shapes.from_config(model_config), counts, device_bytes, processes)
    code = train_main.run_train(cfg, check_inputs(cfg))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        final = {"peak_gib": peak_gib(), "plan_gib": plan.total / GIB, "plan_batch": plan.generation_batch}
        print("FINAL " + json.dumps(final), flush=True)
    return code


def problems(rows: list[dict], final: dict) -> list[str]:
    """Why a variant's numbers fail the check: a non-finite loss or gradient norm, a skipped optimizer step, or a
    measured peak above the plan by more than PEAK_MARGIN (only where a peak is measured: CUDA)."""
    found = []
    for row in rows:
        for key in ("loss", "grad_norm"):
            if not math.isfinite(row[key]):
                found.append(f"step {row['step']}: {key} {row[key]}")
        if row["skipped_steps"] > 0:
            found.append(f"step {row['step']}: {int(row['skipped_steps'])} skipped optimizer step(s)")
    peak, planned = final["peak_gib"], final["plan_gib"]
    if math.isfinite(peak) and peak > planned * (1 + PEAK_MARGIN):
        found.append(
            f"measured peak {peak:.2f} GiB exceeds the plan's {planned:.2f} GiB by more than {PEAK_MARGIN:.0%}"
        )
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run the variants on CPU processes (gloo): a smoke test")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap (GPU 1024, CPU 16)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all that fit)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.cpu else 1024
    if args.worker:
        return worker(args)

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.cpu:
        print("gpu_check: no CUDA GPU on this machine; nothing run (use --cpu for a CPU smoke test of the same path)")
        return 0
    slots = 2 if args.cpu else gpus
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"gpu_check: unknown variant(s) {unknown}; use some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    device = "CPU (gloo processes)" if args.cpu else torch.cuda.get_device_name(0) + f" x{gpus}"
    print(f"gpu_check on {device}, torch {torch.__version__}, max_new_tokens {args.max_new_tokens}", flush=True)
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="kpo_gpu_check_") as tmp:
        model = tiny_qwen3(Path(tmp) / "tiny-qwen3", args.cpu)
        for name in names:
            if VARIANTS[name][0] > slots:
                print(f"[skip] {name}: needs {VARIANTS[name][0]} GPUs, this machine has {slots}", flush=True)
                continue
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--variant",
                name,
                "--model",
                str(model),
                "--out",
                str(Path(tmp) / name),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ] + (["--cpu"] if args.cpu else [])
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
            seconds = time.perf_counter() - start
            got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            final = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
            if proc.returncode != 0 or len(got) != 2 or len(final) != 1:
                failed.append(name)
                print(f"[FAIL] {name} (exit {proc.returncode}):\n{proc.stderr[-4000:]}", flush=True)
                continue
            bad = problems(got, final[0])
            for row in got:
                print(
                    f"[{'FAIL' if bad else 'ok'}] {name} step {row['step']}: loss {row['loss']:+.3e}  "
                    f"grad_norm {row['grad_norm']:.4f}  skipped {int(row['skipped_steps'])}  "
                    f"tokens/s {row['tokens_per_s']:.0f}",
                    flush=True,
                )
            peak, planned = final[0]["peak_gib"], final[0]["plan_gib"]
            measured = f"{peak:.2f} GiB measured" if math.isfinite(peak) else "not measured (CPU)"
            print(
                f"     peak memory {measured} (validation and generation included) vs {planned:.2f} GiB "
                f"planned (--plan; generation batch {final[0]['plan_batch']}); {seconds:.0f} s including start-up",
                flush=True,
            )
            for why in bad:
                print(f"     [FAIL] {why}", flush=True)
            if bad:
                failed.append(name)
            rows += got
    print(
        f"gpu_check: {len(names) - len(failed)} variant(s) run or skipped, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
