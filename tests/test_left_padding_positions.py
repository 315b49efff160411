"""Training log-probs of a left-padded batch equal each sequence's own, unpadded, on a model with absolute
position embeddings (a tiny GPT-2), where position ids that ignore the padding shift every embedding.

Rotary models (every other test model) hide such a bug: attention scores depend only on position differences
(measured 4.8e-7). The reference is the plain model on each unpadded row alone, default positions 0..L-1.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kpo_lightning.algorithms.sequence_logprobs import sequence_logprobs

TEMPERATURE = 0.8


def tiny_gpt2(vocab: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():  # position embeddings of a trained model's size (init is 0.02: differences too small)
        model.transformer.wpe.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_left_padded_rows_score_like_each_row_alone():
    vocab, pad, prompt_width = 40, 0, 7
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, vocab, (n,), generator=gen) for n in (7, 4, 2)]  # left padding of 0, 3, 5
    responses = [torch.randint(2, vocab, (n,), generator=gen) for n in (5, 3, 5)]  # right padding of 0, 2, 0
    width = 5
    ids = torch.full((3, prompt_width + width), pad)
    mask = torch.zeros(3, prompt_width + width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, prompt_width - len(p) : prompt_width] = p
        ids[i, prompt_width : prompt_width + len(r)] = r
        mask[i, prompt_width - len(p) : prompt_width + len(r)] = 1
    model = tiny_gpt2(vocab)

    with torch.no_grad():
        logp, _ = sequence_logprobs(model, ids, mask, prompt_width, temperature=TEMPERATURE)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            alone = torch.cat([p, r])[None]
            logits = model(input_ids=alone).logits[0, len(p) - 1 : -1].float() / TEMPERATURE
            expected = logits.log_softmax(-1).gather(1, r[:, None])[:, 0]
            # float32, the same operations in another batch shape: measured max |diff| 2.4e-7, tolerance 7e-7 (3x);
            # positions shifted by the padding move them by up to 0.22 nats here.
            torch.testing.assert_close(logp[i, : len(r)], expected, rtol=0, atol=7e-7)
