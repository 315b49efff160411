"""token_logprobs / token_entropy against the naive float32 log_softmax + gather."""

import pytest
import torch

from kpo_lightning.algorithms.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy


def _naive(logits, tokens, temperature):
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def _naive_entropy(logits, temperature):
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def _data(dtype, shape=(3, 7, 37), seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=gen) * 4).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    weights = torch.randn(*shape[:-1], generator=gen)
    return logits, tokens, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5, 20, 10_000])
def test_values_and_gradients_match_naive(dtype, temperature, chunk_size):
    logits, tokens, weights = _data(dtype)
    ref_in = logits.clone().requires_grad_()
    ref = _naive(ref_in, tokens, temperature)
    (ref * weights).sum().backward()

    ours_in = logits.clone().requires_grad_()
    out = token_logprobs(ours_in, tokens, temperature, chunk_size)
    (out * weights).sum().backward()

    assert out.dtype == torch.float32 and out.shape == tokens.shape
    torch.testing.assert_close(out, ref.detach(), atol=2e-5, rtol=1e-5)
    assert ours_in.grad.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 3, 1000])
def test_entropy_and_combined_match_naive(dtype, chunk_size):
    logits, tokens, weights = _data(dtype, seed=1)
    for t in (1.0, 0.6):
        ent = token_entropy(logits, t, chunk_size)
        torch.testing.assert_close(ent, _naive_entropy(logits, t), atol=2e-5, rtol=1e-5)
        x = logits.clone().requires_grad_()
        logp, ent2 = token_logprobs_and_entropy(x, tokens, t, chunk_size)
        assert not ent2.requires_grad and logp.requires_grad
        torch.testing.assert_close(ent2, ent)
        torch.testing.assert_close(logp, _naive(logits, tokens, t), atol=2e-5, rtol=1e-5)
        (logp * weights).sum().backward()
        assert x.grad is not None


def test_gradcheck_float64():
    logits, tokens, _ = _data(torch.float64, shape=(2, 3, 6))
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, 0.8, chunk_size=4), (x,))


def test_no_grad_and_plain_tensors_and_shapes():
    logits, tokens, _ = _data(torch.float32, shape=(5, 11))
    with torch.no_grad():
        out = token_logprobs(logits.requires_grad_(), tokens, 1.0, 2)
    assert not out.requires_grad
    torch.testing.assert_close(out, _naive(logits.detach(), tokens, 1.0))
    empty = token_logprobs(torch.zeros(0, 4, 9), torch.zeros(0, 4, dtype=torch.long))
    assert empty.shape == (0, 4)


def test_masked_minus_inf_logits_give_finite_entropy():
    logits = torch.randn(4, 10)
    logits[:, :3] = float("-inf")
    ent = token_entropy(logits, 1.0, chunk_size=3)
    ref = torch.special.entr(torch.softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(ent, ref)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tokens shape"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)


def test_autograd_saves_no_float32_copy_of_logits():
    """The memory claim: with bf16 logits nothing of size (N, V) in float32 is kept for backward."""
    logits, tokens, weights = _data(torch.bfloat16, shape=(64, 1000))
    x = logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(x, tokens, 0.9, chunk_size=8)
    assert not any(dt == torch.float32 and n >= x.numel() for dt, n in saved), saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        _naive(x, tokens, 0.9)
    assert any(dt == torch.float32 and n >= x.numel() for dt, n in saved)  # the naive version does
    (out * weights).sum().backward()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_module_sequence_logprobs_match_a_per_token_loop(char_tokenizer, tiny_model, temperature):
    """KPOModule.sequence_logprobs, through its public signature only, against the definition: the log-prob of
    response token j is log_softmax(model(prefix).logits[-1] / T)[token], prefix = the row's real tokens before it
    (left padding removed). Catches logits taken one position off and a temperature not applied."""
    from kpo_lightning import KPOModule
    from kpo_lightning.config import RolloutConfig

    module = KPOModule(
        tiny_model, char_tokenizer, rollout=RolloutConfig(temperature=temperature), reward_fn=lambda **kw: 0.0
    )
    g = torch.Generator().manual_seed(0)
    prompt_lens, resp_lens, P, R = [5, 2, 3], [4, 1, 2], 5, 4  # rows 1, 2 left-padded; rows 1, 2 right-padded
    ids = torch.full((3, P + R), char_tokenizer.pad_token_id)
    attn = torch.zeros(3, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        ids[i, P - p : P + r] = torch.randint(5, len(char_tokenizer), (p + r,), generator=g)
        attn[i, P - p : P + r] = 1
    with torch.no_grad():
        out, _ = module.sequence_logprobs(tiny_model, ids, attn, P)
        out_e, ent = module.sequence_logprobs(tiny_model, ids, attn, P, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
            for j in range(r):
                prefix = ids[i, P - p : P + j]
                last = tiny_model(input_ids=prefix[None]).logits[0, -1].float() / temperature
                expected = torch.log_softmax(last, -1)[ids[i, P + j]]
                # measured max |diff| 0 (CPU, float32); 4e-6 is ~8 float32 ulps at |logp| ~ 4, for other kernels
                assert abs(out[i, j].item() - expected.item()) < 4e-6, (i, j, out[i, j].item(), expected.item())
                assert abs(out_e[i, j].item() - expected.item()) < 4e-6
                ref_ent = -(torch.softmax(last, -1) * torch.log_softmax(last, -1)).sum()
                assert abs(ent[i, j].item() - ref_ent.item()) < 4e-6
    assert out.shape == (3, R)
