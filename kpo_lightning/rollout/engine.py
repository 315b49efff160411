"""Rollouts: sample G responses per prompt, build the masks, score them, compute group advantages.

The generation engine sits behind a one-method interface (`RolloutEngine.generate`), so a faster engine (vLLM,
SGLang, a server) can replace `HFGenerateEngine` without touching the module or the callback.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import GenerationConfig

from kpo_lightning.algorithms.advantages import group_advantages
from kpo_lightning.algorithms.memory_plan import HEADROOM, Shapes, generation_batch_size, generation_bytes_per_sequence
from kpo_lightning.config import EvalConfig, RolloutConfig
from kpo_lightning.data.prompt_tokens import encode_prompts
from kpo_lightning.models.memory import free_device_bytes
from kpo_lightning.rewards.scoring import score_completions

_ROLLOUT = RolloutConfig()  # SamplingParams' defaults are the config's: one place states them


@dataclass
class SamplingParams:
    """How to sample responses (the knobs every engine understands), and nothing else: an engine samples from
    softmax(logits / temperature) restricted by top-k and top-p, with no other logits processor (no repetition
    penalty, min-p, suppressed tokens, ... whatever the model's own generation config says)."""

    num_samples: int = _ROLLOUT.num_generations
    max_new_tokens: int = _ROLLOUT.max_new_tokens
    temperature: float = _ROLLOUT.temperature  # 0 = greedy (evaluation only: training log-probs need a temperature > 0)
    top_p: float = _ROLLOUT.top_p  # 1.0 = off
    top_k: int = _ROLLOUT.top_k  # 0 = off
    batch_size: int | str = _ROLLOUT.generation_batch_size  # per generate() call; "auto" (free memory), 0 = all
    seed: int | None = None  # seeds this call's sampling; None = the global RNG as it stands

    @classmethod
    def for_training(cls, rollout: RolloutConfig) -> SamplingParams:
        return cls(
            rollout.num_generations,
            rollout.max_new_tokens,
            rollout.temperature,
            rollout.top_p,
            rollout.top_k,
            rollout.generation_batch_size,
        )

    @classmethod
    def for_eval(cls, rollout: RolloutConfig, eval: EvalConfig) -> SamplingParams:
        """k samples per prompt at the evaluation temperature; length and nucleus settings as in training."""
        return cls(
            eval.k,
            eval.max_new_tokens or rollout.max_new_tokens,
            eval.temperature,
            rollout.top_p,
            rollout.top_k,
            rollout.generation_batch_size,
        )


@dataclass
class Generation:
    """Token ids of prompts (left-padded) followed by responses (right-padded), with the masks training needs.

    Row i belongs to prompt i // num_samples: the G samples of a prompt are contiguous (a group).
    """

    input_ids: Tensor  # (N, P + R) prompt then response
    attention_mask: Tensor  # (N, P + R) 1 on real prompt tokens and valid response tokens
    response_mask: Tensor  # (N, R) bool: response tokens the policy produced, up to and including eos
    prompt_length: int  # P: response tokens start at column P
    completions: list[str]  # decoded responses, special tokens removed
    truncated: Tensor  # (N,) bool: no eos within max_new_tokens

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length :]


def sampling_seed(seed: int, rank: int, step: int) -> int:
    """The sampling seed of process `rank` at rollout step `step` of a run seeded `seed`: a hash of the three
    (63 bits), so processes draw independent rollouts and a resumed run draws exactly what an uninterrupted one
    would, whatever the RNG did in between."""
    digest = hashlib.blake2b(f"kpo-sampling:{int(seed)}:{int(rank)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RolloutEngine(Protocol):
    """Anything that samples `params.num_samples` responses for each prompt, from exactly what `params` says
    (softmax(logits / temperature) with top-k / top-p, no other logits processor: the loss assumes it), with
    prompts tokenized by `prompt_tokens.encode_prompt`, seeded by `params.seed` when it is set."""

    def generate(self, model, tokenizer, prompts: list[str], params: SamplingParams) -> Generation: ...


def response_mask_from_ids(response_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Valid response tokens: everything up to and including the first eos; nothing after it.

    Works when pad == eos (SmolLM2): padding is recognised by position (after the first eos), not by id.
    Returns (mask (N, R) bool, truncated (N,) bool: rows with no eos at all).
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response_ids == eos
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~eos_seen_before, ~is_eos.any(dim=1)


def eos_token_ids(tokenizer, model) -> list[int]:
    """The eos ids generation stops at: the generation config's (may be a list) and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def exact_generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """A `GenerationConfig` that samples from exactly softmax(logits / T) with top-k / top-p, nothing else.

    transformers fills every field left unset (None) from `model.generation_config`, so each field that adds a
    logits processor, warper or stopping criterion is set here to its neutral value. The fields whose neutral
    value is None (min_p, suppress_tokens, bad_words_ids, sequence_bias, ...) cannot be protected that way:
    `HFGenerateEngine` also replaces the model's own generation config by this one while it generates.
    """
    sample = params.temperature > 0
    return GenerationConfig(
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample else None,
        top_k=params.top_k if sample else None,  # 0 = off (None would become transformers' default, 50)
        max_new_tokens=params.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        # Neutral values of everything else that changes which token is drawn or when a response ends.
        num_beams=1,
        num_return_sequences=1,
        min_new_tokens=0,  # takes precedence over any min_length (left unset: setting both makes generate warn)
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        output_scores=False,
        output_logits=False,
        return_dict_in_generate=False,
    )


@contextmanager
def model_generation_config(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Give every (sub)model that carries its own `generation_config` (the model, the base model under a peft
    wrapper) a copy of `config` while the block runs, so nothing of the shipped one is merged into a generate
    call; the shipped configs are put back afterwards, also on error."""
    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [vars(m)["generation_config"] for m in owners]
    try:
        for m in owners:
            m.generation_config = copy.deepcopy(config)
        yield
    finally:
        for m, original in zip(owners, saved):
            m.generation_config = original


def generation_compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype `generate`'s KV cache will hold: autocast's when autocast is on, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def resolve_batch_size(
    batch_size: int | str, model: torch.nn.Module, device: torch.device, prompt_tokens: int, new_tokens: int
) -> int:
    """Sequences per `generate` call (0 = all at once). "auto": as many as fit in the device's free memory now
    (CUDA free memory, or available RAM on CPU, less `HEADROOM`), each costing its KV cache over prompt + response
    and its working memory (memory_plan.generation_bytes_per_sequence), as a power of two, at most
    `AUTO_MAX_SEQUENCES`; at least 1. A model whose config does not give the shapes: 0 (all at once)."""
    if batch_size != "auto":
        return int(batch_size)
    try:
        shapes = Shapes.from_config(model.config)
    except AttributeError:
        return 0
    itemsize = generation_compute_dtype(model, device).itemsize
    per_sequence = generation_bytes_per_sequence(shapes, prompt_tokens, new_tokens, itemsize)
    return max(1, generation_batch_size(free_device_bytes(device) * (1 - HEADROOM), per_sequence))


class HFGenerateEngine:
    """Batched sampling with transformers' `generate` (KV cache on), in eval mode, without gradients.

    Samples from exactly what `params` says (see `exact_generation_config`), seeded by `params.seed` when set
    (in a forked RNG, so the caller's RNG stream is left as it was).
    """

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[str], params: SamplingParams) -> Generation:
        device = next(model.parameters()).device
        eos_ids = eos_token_ids(tokenizer, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        ids, mask = encode_prompts(tokenizer, prompts, pad_id)  # left-padded, special tokens as the tokenizer adds
        prompt_ids = ids.repeat_interleave(params.num_samples, dim=0).to(device)
        prompt_mask = mask.repeat_interleave(params.num_samples, dim=0).to(device)

        config = exact_generation_config(params, eos_ids, pad_id)
        was_training = model.training
        model.eval()
        n = prompt_ids.shape[0]
        step = resolve_batch_size(params.batch_size, model, device, prompt_ids.shape[1], params.max_new_tokens) or n
        chunks = []
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=params.seed is not None)
        try:
            with rng, model_generation_config(model, config):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                for start in range(0, n, step):
                    out = model.generate(
                        input_ids=prompt_ids[start : start + step],
                        attention_mask=prompt_mask[start : start + step],
                        generation_config=config,
                    )
                    chunks.append(out[:, prompt_ids.shape[1] :])
        finally:
            model.train(was_training)

        width = max(c.shape[1] for c in chunks)
        response_ids = torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks], dim=0
        )
        response_mask, truncated = response_mask_from_ids(response_ids, eos_ids)
        response_ids = response_ids.masked_fill(~response_mask, pad_id)
        completions = tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(response_ids, response_mask)], skip_special_tokens=True
        )
        return Generation(
            input_ids=torch.cat([prompt_ids, response_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
            response_mask=response_mask,
            prompt_length=prompt_ids.shape[1],
            completions=completions,
            truncated=truncated,
        )


@dataclass
class Rollout:
    """One rollout step's data: the generation, rewards and advantages, plus what the module fills in."""

    generation: Generation
    prompts: list[str]
    answers: list[str]
    rewards: Tensor  # (N,)
    advantages: Tensor  # (N,)
    stats: dict[str, float] = field(default_factory=dict)
    # What the responses were sampled with: the loss computes its log-probs at this temperature and groups rows by
    # its num_samples. None (a rollout built by hand): the module's training settings, as RolloutCallback uses.
    params: SamplingParams | None = None


def make_rollout(
    engine: RolloutEngine,
    model,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    params: SamplingParams,
    reward_fn: Callable[..., float],
    advantage_estimator: str = "grpo",
) -> Rollout:
    """Sample, score and compute group advantages for a batch of prompts."""
    start = time.perf_counter()
    gen = engine.generate(model, tokenizer, prompts, params)
    gen_seconds = time.perf_counter() - start

    group_prompts = [p for p in prompts for _ in range(params.num_samples)]
    group_answers = [a for a in answers for _ in range(params.num_samples)]
    start = time.perf_counter()
    rewards, num_errors, num_timeouts = score_completions(reward_fn, group_prompts, gen.completions, group_answers)
    score_seconds = time.perf_counter() - start
    advantages, adv_stats = group_advantages(rewards, params.num_samples, advantage_estimator)

    lengths = gen.response_mask.sum(dim=1).float()
    stats = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward_errors": float(num_errors),
        "reward_timeouts": float(num_timeouts),
        "zero_var_group_frac": float(adv_stats["zero_var_group_frac"]),
        "response_length": lengths.mean().item(),
        "truncated_frac": gen.truncated.float().mean().item(),
        "empty_frac": (lengths <= 1).float().mean().item(),  # only eos produced
        "generated_tokens": lengths.sum().item(),
        "time_generate_s": gen_seconds,
        "time_score_s": score_seconds,
    }
    return Rollout(gen, group_prompts, group_answers, rewards, advantages.to(rewards.dtype), stats, params)
