"""sequence_logprobs on a tiny Llama: alignment against a per-token prefix loop, left padding, gradients, the
fallback for models without `logits_to_keep`, and `token_logprobs(start=...)` against slicing."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from kpo_lightning.algorithms.logprobs import token_logprobs
from kpo_lightning.algorithms.sequence_logprobs import accepts_logits_to_keep, sequence_logprobs
from kpo_lightning.models.tiny_models import tiny_llama_config

VOCAB, PAD = 53, 0


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(VOCAB, pad_token_id=PAD, initializer_range=0.2)).eval()


def _batch():
    """Three prompts of 5, 2 and 4 tokens, left-padded to 5, each followed by a 4-token response."""
    gen = torch.Generator().manual_seed(1)
    prompt_lens, plen, rlen = [5, 2, 4], 5, 4
    ids = torch.randint(1, VOCAB, (3, plen + rlen), generator=gen)
    mask = torch.ones_like(ids)
    for b, n in enumerate(prompt_lens):
        ids[b, : plen - n] = PAD
        mask[b, : plen - n] = 0
    return ids, mask, plen


def _loop_reference(model, ids, mask, plen, temperature):
    """log_softmax(model(prefix).logits[-1] / T)[token] and its entropy, one unpadded prefix at a time."""
    logp = torch.zeros(ids.shape[0], ids.shape[1] - plen)
    ent = torch.zeros_like(logp)
    with torch.no_grad():
        for b in range(ids.shape[0]):
            for j, t in enumerate(range(plen, ids.shape[1])):
                prefix = ids[b, :t][mask[b, :t].bool()]
                lp = torch.log_softmax(model(prefix[None]).logits[0, -1].float() / temperature, -1)
                logp[b, j] = lp[ids[b, t]]
                ent[b, j] = -(lp.exp() * lp).sum()
    return logp, ent


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no `logits_to_keep`: returns logits for every position."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )


class IgnoresLogitsToKeep(NoLogitsToKeep):
    """Takes `logits_to_keep` but ignores it (all positions come back)."""

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        return super().forward(input_ids, attention_mask, position_ids, use_cache)


@pytest.mark.parametrize("wrap", [None, NoLogitsToKeep, IgnoresLogitsToKeep])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_per_token_prefix_loop_with_left_padding(wrap, temperature):
    model = _model()
    ids, mask, plen = _batch()
    net = wrap(model) if wrap else model
    assert accepts_logits_to_keep(net) == (wrap is not NoLogitsToKeep)
    with torch.no_grad():
        logp, ent = sequence_logprobs(net, ids, mask, plen, temperature, with_entropy=True)
    ref_logp, ref_ent = _loop_reference(model, ids, mask, plen, temperature)
    assert logp.shape == ent.shape == (3, 4)
    # measured max |diff| 4.8e-7 (log-probs from -7.4 to -1.9), entropy 7.2e-7; tolerances ~3x.
    torch.testing.assert_close(logp, ref_logp, atol=1.5e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=0)


def test_only_response_positions_reach_the_lm_head():
    model = _model()
    ids, mask, plen = _batch()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.is_contiguous())))
    sequence_logprobs(model, ids, mask, plen)
    assert seen == [((3, ids.shape[1] - plen, 32), True)]


@pytest.mark.parametrize("wrap", [None, NoLogitsToKeep])
def test_parameter_gradients_match_full_logits_slice(wrap):
    """Gradients through the head-slice (or in-place window) path equal those of full logits + slicing."""
    ids, mask, plen = _batch()
    weights = torch.randn(3, ids.shape[1] - plen, generator=torch.Generator().manual_seed(2))
    grads = []
    for use_ours in (True, False):
        model = _model()
        net = wrap(model) if wrap else model
        if use_ours:
            logp, _ = sequence_logprobs(net, ids, mask, plen, 0.8)
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, plen - 1 : -1]
            logp = torch.log_softmax(logits / 0.8, -1).gather(-1, ids[:, plen:, None]).squeeze(-1)
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        # measured max |diff| 2.4e-6 on gradients up to 5.4; tolerance 3x.
        torch.testing.assert_close(g, grads[1][name], atol=7e-6, rtol=0, msg=name)


def test_prompt_length_out_of_range_is_refused():
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="prompt_length"):
        sequence_logprobs(_model(), ids, mask, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_start_window_matches_slicing(dtype):
    """token_logprobs(full, tokens, start=s) == token_logprobs(full[:, s:s+R], tokens), gradient zero outside."""
    gen = torch.Generator().manual_seed(3)
    full = (torch.randn(2, 9, 17, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, 17, (2, 5), generator=gen)
    weights = torch.randn(2, 5, generator=gen)
    a = full.clone().requires_grad_()
    b = full.clone().requires_grad_()
    ours = token_logprobs(a, tokens, 0.9, chunk_size=3, start=3)
    ref = torch.log_softmax(b[:, 3:8].float() / 0.9, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
    assert a.grad[:, :3].abs().sum() == 0 and a.grad[:, 8:].abs().sum() == 0
    with pytest.raises(ValueError, match="tokens shape"):
        token_logprobs(full, tokens, start=5)  # 5 + 5 > 9 positions


def test_in_place_backward_reuses_the_logits_storage_and_matches():
    """in_place_backward: the same gradient, written over the logits' storage; a second backward raises."""
    gen = torch.Generator().manual_seed(4)
    leaf_a = torch.randn(2, 6, 11, generator=gen, requires_grad=True)
    leaf_b = leaf_a.detach().clone().requires_grad_()
    tokens = torch.randint(0, 11, (2, 4), generator=gen)
    weights = torch.randn(2, 4, generator=gen)
    logits_a, logits_b = leaf_a * 2, leaf_b * 2  # non-leaf, like a model's output
    seen = []
    logits_a.register_hook(lambda g: seen.append(g.data_ptr()))
    ours = token_logprobs(logits_a, tokens, 0.8, chunk_size=3, start=1, in_place_backward=True)
    ref = token_logprobs(logits_b, tokens, 0.8, chunk_size=3, start=1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    (ours * weights).sum().backward(retain_graph=True)
    (ref * weights).sum().backward()
    assert seen == [logits_a.data_ptr()]
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (ours * weights).sum().backward()
