"""Per-token log-probabilities and entropies from LM logits, without a full float32 log-softmax.

The naive `torch.log_softmax(logits.float() / T, -1).gather(-1, tokens)` materialises several (B, T, V)
float32 tensors, and autograd keeps the float32 log-softmax output alive until backward. With a 50k-150k
vocabulary that is the largest allocation of an RL step. Here rows are processed in chunks: each chunk
goes through one fused float32 log_softmax (after scaling by 1/T) and only the sampled token's value is
kept. A custom autograd Function saves only the logits (already alive) and the tokens; its backward
recomputes softmax chunk by chunk, so the only (B, T, V) tensor it creates is the gradient itself, in
the logits' dtype. Plain chunking under autograd helps little: every chunk's float32 input of
logsumexp/log_softmax is saved for backward, which adds up to a full (B, T, V) float32 copy again.
Measured peaks above the logits for 2048 tokens x 49,152 vocabulary, bf16 logits, forward+backward on CPU
(benchmarks/logprob_memory.py): naive 1157 MiB, plain chunking 758 MiB, this module 244 MiB (of which
192 MiB is the bf16 gradient itself). Tokens must be valid ids in [0, V) (mask padding afterwards).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Default chunk: about this many float32 elements per temporary (32 MiB), whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 23


def _rows_per_chunk(chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: `chunk_size` if given, else enough rows for ~32 MiB of float32 per temporary."""
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits, float64 for float64 (so gradcheck and fp64 users keep precision)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _check(logits: Tensor, tokens: Tensor | None, temperature: float) -> None:
    """Shape and value checks shared by the public functions."""
    if logits.dim() < 1:
        raise ValueError("logits must have a trailing vocabulary dimension")
    if tokens is not None and tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits shape without the vocabulary "
                         f"dimension {tuple(logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_chunk(chunk: Tensor, inv_t: float, ct: torch.dtype, fn) -> Tensor:
    """fn(chunk.to(ct) * inv_t, -1) for fn in (log_softmax, softmax): one fused kernel when inv_t == 1."""
    if inv_t == 1.0:
        return fn(chunk, -1, dtype=ct)
    x = chunk.to(ct, copy=True).mul_(inv_t)
    return fn(x, -1)


@torch.no_grad()
def _chunked_forward(
    logits2d: Tensor, tokens1d: Tensor | None, temperature: float, rows: int, want_entropy: bool
) -> tuple[Tensor | None, Tensor | None]:
    """One pass over row chunks: (token log-probs or None, entropy or None), each (N,).

    Per chunk: one fused log_softmax in the compute dtype (plus a scaled copy when T != 1); on CPU this is
    faster than the naive whole-tensor version and far faster than logsumexp.
    """
    n = logits2d.shape[0]
    dev = logits2d.device
    ct = _compute_dtype(logits2d)
    logp = torch.empty(n, dtype=ct, device=dev) if tokens1d is not None else None
    ent = torch.empty(n, dtype=ct, device=dev) if want_entropy else None
    inv_t = 1.0 / float(temperature)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        lp = _scaled_chunk(logits2d[start:end], inv_t, ct, torch.log_softmax)
        if logp is not None:
            logp[start:end] = lp.gather(1, tokens1d[start:end, None]).squeeze(1)
        if ent is not None:
            # H = -sum p log p; nansum drops the 0 * -inf of masked (-inf) logits.
            ent[start:end] = -torch.nansum(torch.exp(lp).mul_(lp), dim=-1)
        del lp
    return logp, ent


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token]; saves only logits and tokens, backward recomputes softmax per chunk."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, tokens1d: Tensor, temperature: float, rows: int, want_entropy: bool):
        logp, ent = _chunked_forward(logits2d, tokens1d, temperature, rows, want_entropy)
        ctx.save_for_backward(logits2d, tokens1d)
        ctx.temperature = temperature
        ctx.rows = rows
        if ent is None:
            ent = torch.empty(0, dtype=logp.dtype, device=logits2d.device)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor, _grad_ent: Tensor | None):
        logits2d, tokens1d = ctx.saved_tensors
        inv_t = 1.0 / float(ctx.temperature)
        rows = ctx.rows
        ct = _compute_dtype(logits2d)
        grad = torch.empty_like(logits2d)
        g_out = grad_logp.to(ct) * inv_t
        for start in range(0, logits2d.shape[0], rows):
            end = min(logits2d.shape[0], start + rows)
            # d logp / d logits = (onehot(token) - softmax(logits / T)) / T, scaled by the incoming gradient.
            g = _scaled_chunk(logits2d[start:end], inv_t, ct, torch.softmax)
            g.mul_(-g_out[start:end, None])
            g.scatter_add_(1, tokens1d[start:end, None], g_out[start:end, None])
            grad[start:end] = g
            del g
        return grad, None, None, None, None


def _run(logits: Tensor, tokens: Tensor | None, temperature: float, chunk_size: int | None, want_entropy: bool):
    """Flatten leading dims, dispatch to the autograd Function when a gradient is needed, reshape back."""
    _check(logits, tokens, temperature)
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)
    rows = _rows_per_chunk(chunk_size, vocab)
    if tokens is None:
        _, ent = _chunked_forward(logits2d, None, temperature, rows, True)
        return None, ent.reshape(lead)
    tokens1d = tokens.reshape(-1).long()
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, ent = _TokenLogprobs.apply(logits2d, tokens1d, float(temperature), rows, want_entropy)
    else:
        logp, ent = _chunked_forward(logits2d, tokens1d, temperature, rows, want_entropy)
    return logp.reshape(lead), (ent.reshape(lead) if want_entropy else None)


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of each token under softmax(logits / temperature), shape of `tokens`.

    logits: (..., V) in any float dtype; tokens: (...) integer ids in [0, V). Rows are processed
    `chunk_size` at a time (default: enough rows for ~32 MiB of float32 per temporary). The result is
    float32 (float64 for float64 logits). Differentiable with respect to `logits`; the gradient comes
    back in the logits' dtype.
    """
    return _run(logits, tokens, temperature, chunk_size, want_entropy=False)[0]


def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy (nats) of softmax(logits / temperature) per position, shape logits.shape[:-1], float32
    (float64 for float64 logits).

    A diagnostic: computed without gradient.
    """
    return _run(logits, None, temperature, chunk_size, want_entropy=True)[1]


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(token_logprobs, token_entropy) in one pass over the logits; only the log-probs carry a gradient."""
    logp, ent = _run(logits, tokens, temperature, chunk_size, want_entropy=True)
    return logp, ent
