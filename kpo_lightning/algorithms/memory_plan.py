"""The memory plan: bytes per process of a training run, worked out from the model's config alone (no weights).

Plain arithmetic on a transformers config (read by attribute: `hidden_size`, `num_hidden_layers`,
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`, `vocab_size`) and the run's
`Config`. Exact terms: weights, gradients and AdamW state (from exact parameter counts), the KV cache per token
(what transformers' `DynamicCache` holds) and the logits of the log-prob forward (what `sequence_logprobs` asks the
LM head for). Estimates: activations saved for backward, the chunk temporaries of the log-prob path, and the
transient working memory of `generate` (prefill and sampling). `--plan` prints the result (cli/plan.py);
`rollout.generation_batch_size=auto` sizes each `generate` with `generation_batch_size` (rollout/engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kpo_lightning.algorithms.logprobs import _CHUNK_ELEMENTS
from kpo_lightning.config import Config

GIB = 2**30
FLOAT32 = 4
# Share of the device kept free for what the plan does not count (CUDA context, allocator fragmentation).
HEADROOM = 0.10
# At most this many sequences per `generate` call under `rollout.generation_batch_size=auto`.
AUTO_MAX_SEQUENCES = 1024
# Float32 temporaries of the log-prob path alive at once, each one chunk (`logprobs._CHUNK_ELEMENTS` elements):
# log_softmax or softmax output, its scaled input when temperature != 1, exp(lp) and nansum's copy for the entropy.
LOGPROB_CHUNK_TEMPORARIES = 4
# Float32 (N, V) tensors `generate` holds per sampling step: the next-token logits' float32 copy, the processed
# scores, the probabilities, and top-p's sorted copy.
SAMPLING_VOCAB_COPIES = 4


@dataclass(frozen=True)
class Shapes:
    """The few numbers of a decoder-only transformer the plan needs, read from its config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Shapes:
        """Read from a transformers `PretrainedConfig`: `head_dim` when the config gives it (Qwen3: 128 with hidden
        2560 and 32 heads, not 80), `num_key_value_heads` when it gives it (grouped-query attention); the text
        model's config of a multimodal one. Raises AttributeError when the config lacks a shape."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
            vocab=int(config.vocab_size),
        )


def kv_cache_bytes_per_token(shapes: Shapes, dtype_bytes: int) -> int:
    """Bytes of the KV cache per token of one sequence: layers x (key + value) x kv_heads x head_dim x dtype bytes.
    Exact for transformers' `DynamicCache` (tests/test_memory_plan.py compares it with a real cache)."""
    return shapes.layers * 2 * shapes.kv_heads * shapes.head_dim * dtype_bytes


def logits_bytes(sequences: int, positions: int, vocab: int, dtype_bytes: int) -> int:
    """Bytes of (sequences, positions, vocab) logits: what the LM head returns to `sequence_logprobs`, which asks for
    the response positions only (`logits_to_keep`), so `positions` is the response length. Exact."""
    return sequences * positions * vocab * dtype_bytes


def logprob_temporaries_bytes(vocab: int) -> int:
    """Upper estimate of the float32 chunk temporaries the chunked log-prob path (algorithms/logprobs.py) holds at
    once beside the logits: `LOGPROB_CHUNK_TEMPORARIES` chunks of about 2**23 elements (at least one row)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return LOGPROB_CHUNK_TEMPORARIES * rows * vocab * FLOAT32


def activation_elements_per_token_layer(shapes: Shapes) -> tuple[int, int]:
    """(compute-dtype elements, float32 elements) one decoder layer saves for backward per token (estimate).

    Compute dtype: the inputs of q/k/v and of gate/up (2 x hidden), q and k before their norms and q, k, v after
    (3 x heads x head_dim + 3 x kv_heads x head_dim), the attention output (counted in the 3 x heads x head_dim),
    the MLP's gate, SiLU(gate), up and product (4 x intermediate), the residual inputs (2 x hidden). Float32: the
    RMSNorms upcast, saving input and normalised value (2 x 2 x hidden, plus 2 x (heads + kv_heads) x head_dim for
    the q/k norms). Attention probabilities are not counted: SDPA's fused kernels (flash / memory-efficient) keep
    only a log-sum-exp per row.
    """
    h, q, kv = shapes.hidden, shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    compute = 4 * h + 3 * q + 3 * kv + 4 * shapes.intermediate
    float32 = 4 * h + 2 * (q + kv)
    return compute, float32


def activation_bytes(shapes: Shapes, tokens: int, compute_bytes: int, residual_bytes: int, checkpointing: bool) -> int:
    """Estimated activation memory of one forward/backward over `tokens` tokens (rows x padded length).

    Without checkpointing: every layer's saved tensors, tokens x layers x (compute elements x compute bytes +
    float32 elements x 4). With gradient checkpointing: each layer's input (tokens x layers x hidden x residual
    bytes) plus one layer's saved tensors while it is recomputed in backward.
    """
    compute, float32 = activation_elements_per_token_layer(shapes)
    one_layer = tokens * (compute * compute_bytes + float32 * FLOAT32)
    if not checkpointing:
        return shapes.layers * one_layer
    return tokens * shapes.layers * shapes.hidden * residual_bytes + one_layer


def generation_bytes_per_sequence(shapes: Shapes, prompt_tokens: int, new_tokens: int, compute_bytes: int) -> int:
    """Bytes one sequence costs inside `generate`: its KV cache over prompt + response (exact: the cache ends one
    token shorter, the last sampled token is never fed back) plus an estimate of its transient working memory: the
    prefill's largest per-layer tensors (prompt_tokens x (2 x hidden + 3 x intermediate + (heads + 2 x kv_heads) x
    head_dim) in the compute dtype, plus heads x prompt_tokens^2 attention scores in case the attention kernel
    materialises them) and the float32 vocabulary-sized tensors of each sampling step."""
    kv = kv_cache_bytes_per_token(shapes, compute_bytes) * (prompt_tokens + new_tokens)
    per_token = 2 * shapes.hidden + 3 * shapes.intermediate + (shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim
    prefill = prompt_tokens * per_token * compute_bytes + shapes.heads * prompt_tokens**2 * compute_bytes
    sampling = SAMPLING_VOCAB_COPIES * shapes.vocab * FLOAT32
    return kv + prefill + sampling


def generation_batch_size(free_bytes: float, bytes_per_sequence: int, at_most: int = AUTO_MAX_SEQUENCES) -> int:
    """Sequences per `generate` that fit in `free_bytes`: the largest power of two whose sequences fit (a power of
    two so a little more or less free memory does not change the batch, hence the sampling), at most `at_most`;
    0 when not even one fits."""
    fit = int(free_bytes // max(1, bytes_per_sequence))
    if fit < 1:
        return 0
    return min(2 ** int(math.log2(fit)), at_most)


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts of the policy (tied weights once), from the model built on the meta device."""

    total: int  # every parameter, adapters included
    trainable: int  # what gets gradients and AdamW state (the adapters only under LoRA)
    root: int  # parameters outside the decoder layers (embeddings, final norm, untied head): FSDP's root unit
    largest_layer: int  # the largest decoder layer: one FSDP unit


def dtype_bytes_of(precision: str) -> tuple[int, int]:
    """(weight bytes, compute bytes) under `trainer.precision`: float32 master weights except under bf16-true,
    bfloat16 compute under both bf16 precisions."""
    weight = 2 if precision == "bf16-true" else 4
    compute = 2 if precision.startswith("bf16") else 4
    return weight, compute


@dataclass
class MemoryPlan:
    """Bytes per process, line by line, and whether they fit the device."""

    device_bytes: float
    processes: int
    sharded: bool
    lines: dict[str, float] = field(default_factory=dict)  # name -> bytes, in the order printed
    generation_batch: int = 0  # sequences per generate at the plan's free memory (0: none fits)
    generation_sequences: int = 0  # the most sequences one generate would be asked for (rollout or validation)
    persistent: float = 0.0
    generation_peak: float = 0.0
    training_peak: float = 0.0
    activations_other: float = 0.0  # activations with the other checkpointing setting (for comparison)

    @property
    def total(self) -> float:
        return max(self.generation_peak, self.training_peak)

    @property
    def usable(self) -> float:
        return self.device_bytes * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return self.generation_batch >= 1 and self.total <= self.usable


def plan_memory(
    cfg: Config, shapes: Shapes, counts: ParameterCounts, device_bytes: float, processes: int
) -> MemoryPlan:
    """The per-process budget of `cfg` on a device of `device_bytes` with `processes` processes in all.

    Persistent: weights, gradients and AdamW's two moments (divided by the process count under FSDP; under LoRA only
    the adapters have gradients and state; a KL reference copy when loss.beta > 0 and LoRA is off). Generation
    peak: persistent + the compute-dtype weights `generate` uses (under FSDP the full weights, gathered once) + the
    KV cache and working memory of the chosen batch. Training peak: persistent + compute-dtype weight copies
    (autocast's cache of the trainable weights, or FSDP's gathered root and two layers) + the logits and chunk
    temporaries of the log-prob path at the micro-batch + the activations.
    """
    weight_b, compute_b = dtype_bytes_of(cfg.trainer.precision)
    sharded = cfg.trainer.strategy == "fsdp"
    shard = processes if sharded else 1
    plan = MemoryPlan(device_bytes=device_bytes, processes=processes, sharded=sharded)
    lines = plan.lines
    lines["weights"] = counts.total * weight_b / shard
    lines["gradients"] = counts.trainable * weight_b / shard
    lines["optimizer (AdamW, 2 moments)"] = 2 * counts.trainable * weight_b / shard
    if cfg.loss.beta > 0 and cfg.model.lora.r == 0:
        lines["KL reference copy"] = counts.total * weight_b / shard
    plan.persistent = sum(lines.values())

    # Generation: the longest prompt + response of a training rollout or a validation sample.
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    # Unsharded mixed precision: autocast caches a compute-dtype copy of each trainable weight, and casts frozen
    # ones per op (at most about one layer at a time).
    cast_copies = 0.0 if compute_b == weight_b else (counts.trainable + counts.largest_layer) * compute_b
    gen_weights = counts.total * compute_b if sharded else cast_copies
    per_sequence = generation_bytes_per_sequence(shapes, cfg.data.max_prompt_tokens, new_tokens, compute_b)
    rollout_sequences = math.ceil(cfg.data.prompts_per_step / processes) * cfg.rollout.num_generations
    val_sequences = cfg.data.prompts_per_step * cfg.eval.k if cfg.eval.every_n_steps > 0 else 0
    plan.generation_sequences = max(rollout_sequences, val_sequences)
    requested = cfg.rollout.generation_batch_size
    free = plan.usable - plan.persistent - gen_weights
    if requested == "auto":
        batch = min(generation_batch_size(free, per_sequence), plan.generation_sequences)
    else:
        batch = int(requested) or plan.generation_sequences
        batch = batch if batch * per_sequence <= free else 0
    plan.generation_batch = batch
    shown_batch = max(batch, 1)
    kv = kv_cache_bytes_per_token(shapes, compute_b) * (cfg.data.max_prompt_tokens + new_tokens) * shown_batch
    lines["generation: weights in compute dtype" + (" (FSDP gathered)" if sharded else "")] = gen_weights
    lines[f"generation: KV cache at batch {shown_batch}" + ("" if batch else " (does not fit)")] = kv
    lines["generation: working memory (estimate)"] = per_sequence * shown_batch - kv
    plan.generation_peak = plan.persistent + gen_weights + per_sequence * shown_batch

    # Training: one micro-batch forward/backward over the longest prompt + response.
    length = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    minibatch_rows = math.ceil(rollout_sequences / cfg.optim.num_minibatches)
    rows = cfg.optim.micro_batch_size or minibatch_rows
    if cfg.optim.max_tokens_per_micro_batch > 0:
        rows = min(rows, max(1, cfg.optim.max_tokens_per_micro_batch // length))
    rows = min(rows, minibatch_rows)
    train_weights = (counts.root + 2 * counts.largest_layer) * compute_b if sharded else cast_copies
    lines["training: weights in compute dtype" + (" (FSDP root + 2 layers)" if sharded else "")] = train_weights
    lines[f"training: logits at micro-batch {rows}"] = logits_bytes(
        rows, cfg.rollout.max_new_tokens, shapes.vocab, compute_b
    )
    lines["training: log-prob chunk temporaries (estimate)"] = logprob_temporaries_bytes(shapes.vocab)
    checkpointing = cfg.model.gradient_checkpointing
    tokens = rows * length
    act = activation_bytes(shapes, tokens, compute_b, weight_b, checkpointing)
    plan.activations_other = activation_bytes(shapes, tokens, compute_b, weight_b, not checkpointing)
    lines[f"training: activations ({'with' if checkpointing else 'without'} checkpointing, estimate)"] = act
    plan.training_peak = (
        plan.persistent
        + train_weights
        + lines[f"training: logits at micro-batch {rows}"]
        + lines["training: log-prob chunk temporaries (estimate)"]
        + act
    )
    return plan
