"""The sampler draws from exactly softmax(logits / T) (top-k / top-p when set), checked against a plain draw.

The reference below is a hand-written decoding loop: a full forward per step (no KV cache), logits / T, an optional
top-k / top-p cut, softmax, `torch.multinomial`, from the same seed. `HFGenerateEngine` must draw the very same
tokens. Any non-neutral value in the engine's own generation config (a repetition penalty, a minimum length, an
n-gram ban, typical-p, a cutoff, ...) changes some draw, whatever the model ships (the model here ships nothing).
"""

from __future__ import annotations

import pytest
import torch

from kpo_lightning.data.prompt_tokens import encode_prompts
from kpo_lightning.rollout.engine import HFGenerateEngine, SamplingParams, response_mask_from_ids

PROMPTS = ["12+34=", "7+8=", "99+1=", "3+3="]


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny random Llama with its LM head scaled x8: logits of order 1-5 instead of ~0.1, so that draws repeat
    tokens and a penalty or cut that rescales logits moves probabilities by more than rounding (the random model's
    near-uniform logits hide a repetition penalty of 1.1)."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(8.0)
    return tiny_model


def reference_draw(model, tokenizer, prompts: list[str], params: SamplingParams) -> torch.Tensor:
    """Response ids drawn by a plain loop: each step softmax(cut(logits / T)) of the whole sequence's last
    position, one `torch.multinomial` over the batch; finished rows get pad; stops when every row has eos."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts, pad)
    ids = ids.repeat_interleave(params.num_samples, dim=0)
    mask = mask.repeat_interleave(params.num_samples, dim=0)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(params.seed)
        for _ in range(params.max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            logits = logits / params.temperature
            if params.top_k > 0:
                kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if params.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                drop_sorted = cum - sorted_logits.softmax(dim=-1) >= params.top_p
                drop = drop_sorted.scatter(1, order, drop_sorted)
                logits = logits.masked_fill(drop, float("-inf"))
            token = torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            done |= token == eos
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
            if done.all():
                break
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9)],
    ids=["plain", "T=0.7", "top-k", "top-p"],
)
def test_engine_draws_exactly_the_plain_softmax_draw(char_tokenizer, sharp_model, temperature, top_k, top_p):
    params = SamplingParams(
        num_samples=8, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k, batch_size=0, seed=123
    )
    gen = HFGenerateEngine().generate(sharp_model, char_tokenizer, PROMPTS, params)
    expected = reference_draw(sharp_model, char_tokenizer, PROMPTS, params)
    expected_mask, _ = response_mask_from_ids(expected, [char_tokenizer.eos_token_id])
    got = gen.response_ids
    assert got.shape == expected.shape
    # Enough draws that a processor would show: 32 rows, at least 100 sampled tokens, repeated tokens present
    # (what repetition penalties and n-gram bans act on), rows of different lengths.
    assert int(expected_mask.sum()) >= 100
    assert torch.equal(gen.response_mask, expected_mask)
    assert torch.equal(got, expected.masked_fill(~expected_mask, char_tokenizer.pad_token_id))


def test_the_reference_draw_sees_a_repetition_penalty(char_tokenizer, sharp_model):
    """The comparison has teeth: generate with a penalty (1.1, the issue's example) draws other tokens."""
    from transformers import GenerationConfig

    params = SamplingParams(num_samples=8, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=123)
    expected = reference_draw(sharp_model, char_tokenizer, PROMPTS, params)
    ids, mask = encode_prompts(char_tokenizer, PROMPTS, char_tokenizer.pad_token_id)
    config = GenerationConfig(
        do_sample=True,
        top_k=0,
        max_new_tokens=12,
        repetition_penalty=1.1,
        eos_token_id=char_tokenizer.eos_token_id,
        pad_token_id=char_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        out = sharp_model.generate(
            input_ids=ids.repeat_interleave(8, 0), attention_mask=mask.repeat_interleave(8, 0), generation_config=config
        )
    penalised = out[:, ids.shape[1] :]
    width = min(penalised.shape[1], expected.shape[1])
    assert not torch.equal(penalised[:, :width], expected[:, :width])
