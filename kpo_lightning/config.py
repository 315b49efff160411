"""Typed configuration: dataclasses behind OmegaConf, so a typo or a wrong type is an error, not a silent default.

The dataclass defaults are the library's defaults (what you get building the pieces in Python);
`kpo_lightning/conf/*.yaml` holds the runs (`default.yaml` is the embedded default job, other files are presets
merged over it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoraConfig:
    r: int = 0  # 0 disables LoRA (full fine-tuning)
    alpha: int = 16  # LoRA scaling numerator (lora_alpha)
    dropout: float = 0.0  # must be 0.0: dropout noise would enter the pi_theta/pi_old ratios
    target_modules: str = "all-linear"  # "all-linear" or comma-separated module names (q_proj,v_proj)


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-arith"  # a local folder, a hub name, or a built-in: tiny-arith, tiny-chain, smollm2
    gguf_file: str | None = None  # a GGUF file inside name_or_path (transformers `gguf_file=`)
    dtype: str = "float32"  # float32, bfloat16, float16 (training: float32 master weights unless bf16-true)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    source: str = "arithmetic"  # "arithmetic", "chain", a .jsonl/.json/.parquet/.csv file, or a dataset name
    split: str = "train"  # split of a hub dataset
    subset: str | None = None  # dataset config name for hub datasets
    prompt_key: str = "prompt"  # record field with the prompt (dotted paths work; chat message lists too)
    answer_key: str = "answer"  # record field with the reference answer
    prompt_template: str = "{prompt}"  # formats the record's prompt field into the user message
    system_prompt: str | None = None  # a system message (chat template) or a prefix line
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template
    # extra variables for the chat template (apply_chat_template keyword arguments), e.g. {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompts_per_step: int = 8  # prompts per rollout step, all processes together (each gets G samples)
    max_prompt_tokens: int = 256  # longer prompts are skipped and counted
    val_source: str | None = None  # a separate validation source; default: held out from `source`
    val_subset: str | None = None  # dataset config name of a hub val_source
    val_split: str = "test"  # split of a hub val_source
    val_size: int = 64  # held-out prompts used for validation
    shuffle: bool = True  # reshuffle finite sources every epoch (seeded)
    streaming: bool = True  # stream hub datasets instead of downloading them whole
    arithmetic_max_operand: int = 99  # built-in task: operands drawn from [0, this]
    chain_min_operands: int = 5  # chain task: fewest one-digit operands a problem adds (5: ~40 response tokens)
    chain_max_operands: int = 16  # chain task: most operands (16: ~130 response tokens); validation spans min..max
    chain_curriculum_prompts: int = 0  # chain task: the operand cap grows from min to max over this many prompts


@dataclass
class RolloutConfig:
    num_generations: int = 8  # G: samples per prompt (the group)
    max_new_tokens: int = 16  # response length cap; responses cut here are counted (train/truncated_frac)
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    top_p: float = 1.0  # nucleus sampling (1.0 = off)
    top_k: int = 0  # 0 disables
    # sequences per generate() call: "auto" = as many as the device's free memory holds (KV cache of the longest
    # prompt + response, kpo_lightning/algorithms/memory_plan.py; a power of two, at most 1024); 0 = all at once
    generation_batch_size: int | str = "auto"


@dataclass
class RewardConfig:
    fn: str = "math"  # "math" (boxed answer + math-verify), "package.module:function" or "path/to/file.py:function"
    timeout_s: float = 2.0  # seconds one sample's reward may take (math check or user function); slower scores 0
    answer_after_think: bool = True  # math: read the answer after the last </think>; unclosed <think> scores 0
    num_workers: int = 0  # processes running a user reward.fn in parallel; 0 = min(4, CPUs)
    worker_memory_mb: int = 4096  # address-space cap of each user reward process (MB); 0 = none


@dataclass
class LossConfig:
    type: str = "kpo_clipped"  # grpo, gspo, gmpo, kpo, kpo_clipped
    # None means "the paper's value for this loss type" (see kpo_lightning.algorithms.losses.LOSS_DEFAULTS)
    kalman_q: float | None = None  # Q, process noise of the filter; only Q/V matters; or set kalman_tau instead
    # tau: Q/V = (kalman_tau / L)^2 (not with kalman_q); neither set: tau 4 for kpo/kpo_clipped (losses.py)
    kalman_tau: float | None = None
    kalman_ref_length: int | None = None  # L of kalman_tau in tokens; None = rollout.max_new_tokens
    kalman_v: float | None = None  # V, observation noise (paper: 1)
    kalman_p0: float | None = None  # P0, initial state variance (released code: 0)
    clip_low: float | None = None  # eps_low: ratio clipped below at 1 - eps_low (grpo 0.2, kpo_clipped 3e-4)
    clip_high: float | None = None  # eps_high: ratio clipped above at 1 + eps_high (grpo 0.2, kpo_clipped 4e-4)
    dual_clip: float | None = None  # 0 disables
    agg: str = "seq-mean-token-mean"  # token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm
    agg_norm_constant: float | None = None  # for seq-mean-token-sum-norm; default max_new_tokens
    beta: float = 0.0  # KL coefficient against the reference snapshot; 0 = no reference model
    kl_estimator: str = "k3"  # k1, k2, k3 (Schulman's estimators of KL(pi || ref))
    advantage: str = "grpo"  # grpo, dr_grpo, rloo


@dataclass
class OptimConfig:
    lr: float = 1e-6  # AdamW learning rate (peak, after warm-up; constant afterwards)
    weight_decay: float = 0.1  # on matrices only, not biases or norms
    betas: tuple = (0.9, 0.999)  # AdamW betas
    warmup_ratio: float = 0.05  # linear warm-up over this share of all optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    num_minibatches: int = 4  # optimizer steps per rollout epoch; mini-batches 2.. are off-policy
    epochs_per_rollout: int = 1  # passes over each rollout's mini-batches
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole mini-batch
    max_tokens_per_micro_batch: int = 0  # cap on (rows x padded length) per forward/backward; 0 = no cap
    max_skipped_steps: int = 10  # consecutive non-finite steps before the run stops


@dataclass
class TrainerConfig:
    max_steps: int = 100  # rollout steps
    accelerator: str = "auto"  # cpu, gpu, auto (Lightning)
    devices: str = "1"  # an int as a string, "auto", or a list like "0,1"
    num_nodes: int = 1  # machines (Lightning)
    strategy: str = "auto"  # auto, ddp, fsdp (FSDP2, kpo_lightning/training/strategies.py)
    precision: str = "32-true"  # 32-true, bf16-mixed (float32 weights, bf16 compute), bf16-true (bf16 weights)
    log_every_n_steps: int = 1  # Lightning's own logging interval (our curves log every rollout step)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50  # save every N rollout steps (and at the end, on Ctrl-C and SIGTERM); 0 = end only
    keep_last: int = 2  # checkpoints kept in output_dir/checkpoints


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # validate before training and every N rollout steps; 0 = no validation at all
    k: int = 4  # samples per validation prompt (avg@k, pass@k)
    temperature: float = 1.0  # sampling temperature for avg@k / pass@k
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens


@dataclass
class LogConfig:
    samples_every_n_steps: int = 10  # sample completions as text in TensorBoard
    ratio_plot_every_n_steps: int = 10  # raw vs filtered ratio figure


@dataclass
class Config:
    seed: int = 0  # seeds sampling, data order and initialisation
    output_dir: str = "outputs/default"  # config.yaml, checkpoints/, tensorboard/, final/ go here
    resume: str | None = None  # "auto", "auto_or_fresh" or a checkpoint path (see docs/reliability.md)
    mode: str = "train"  # train or eval
    preset: str | None = None  # a file NAME.yaml (preset_dir's, else built in) merged over the default
    preset_dir: str | None = None  # a folder of your own NAME.yaml presets, searched before the built-in ones
    debug: bool = False  # show tracebacks for input errors
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
