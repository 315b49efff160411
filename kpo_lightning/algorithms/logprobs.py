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
Logits are read through strided views, never copied; `start` scores a window of a longer sequence's logits
without slicing them (a slice's backward would zero-pad a copy of the gradient), and `in_place_backward`
writes the gradient over the logits themselves when the caller owns them (`sequence_logprobs` does).
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


def _check(logits: Tensor, tokens: Tensor | None, temperature: float, start: int) -> None:
    """Shape and value checks shared by the public functions."""
    if logits.dim() < 1:
        raise ValueError("logits must have a trailing vocabulary dimension")
    if tokens is not None and not (tokens.shape == logits.shape[:-1] and start == 0):
        ok = (
            logits.dim() >= 2
            and tokens.dim() >= 1
            and tokens.shape[:-1] == logits.shape[:-2]
            and 0 <= start
            and start + tokens.shape[-1] <= logits.shape[-2]
        )
        if not ok:
            raise ValueError(
                f"tokens shape {tuple(tokens.shape)} must equal logits shape without the vocabulary "
                f"dimension {tuple(logits.shape[:-1])}, or (with start={start}) fit inside it along "
                f"the position dimension -2"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_chunk(chunk: Tensor, inv_t: float, ct: torch.dtype, fn) -> Tensor:
    """fn(chunk.to(ct) * inv_t, -1) for fn in (log_softmax, softmax): one fused kernel when inv_t == 1."""
    if inv_t == 1.0:
        return fn(chunk, -1, dtype=ct)
    x = chunk.to(ct, copy=True).mul_(inv_t)
    return fn(x, -1)


def _blocks(sequences: int, positions: int, rows: int):
    """(s0, s1, p0, p1) blocks covering a (sequences, positions) grid with at most about `rows` cells each:
    whole sequences at a time when a sequence is shorter than `rows`, else `rows` positions of one sequence."""
    if positions == 0:
        return
    if positions >= rows:
        for s in range(sequences):
            for p0 in range(0, positions, rows):
                yield s, s + 1, p0, min(positions, p0 + rows)
    else:
        per = rows // positions
        for s0 in range(0, sequences, per):
            yield s0, min(sequences, s0 + per), 0, positions


@torch.no_grad()
def _chunked_forward(
    logits3d: Tensor, tokens2d: Tensor | None, start: int, temperature: float, rows: int, want_entropy: bool
) -> tuple[Tensor | None, Tensor | None]:
    """One pass over chunks: (token log-probs or None, entropy or None), each (S, P).

    logits3d is (S, L, V) with any strides; position `start + j` of sequence s scores tokens2d[s, j]; P is
    tokens2d.shape[1] (L - start without tokens). Chunks are strided views, never copies of the logits.
    Per chunk: one fused log_softmax in the compute dtype (plus a scaled copy when T != 1); on CPU this is
    faster than the naive whole-tensor version and far faster than logsumexp.
    """
    seqs = logits3d.shape[0]
    pos = tokens2d.shape[1] if tokens2d is not None else logits3d.shape[1] - start
    dev = logits3d.device
    ct = _compute_dtype(logits3d)
    logp = torch.empty(seqs, pos, dtype=ct, device=dev) if tokens2d is not None else None
    ent = torch.empty(seqs, pos, dtype=ct, device=dev) if want_entropy else None
    inv_t = 1.0 / float(temperature)
    for s0, s1, p0, p1 in _blocks(seqs, pos, rows):
        lp = _scaled_chunk(logits3d[s0:s1, start + p0 : start + p1], inv_t, ct, torch.log_softmax)
        if logp is not None:
            logp[s0:s1, p0:p1] = lp.gather(-1, tokens2d[s0:s1, p0:p1, None]).squeeze(-1)
        if ent is not None:
            # H = -sum p log p; nansum drops the 0 * -inf of masked (-inf) logits.
            ent[s0:s1, p0:p1] = -torch.nansum(torch.exp(lp).mul_(lp), dim=-1)
        del lp
    return logp, ent


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token]; saves only logits and tokens, backward recomputes softmax per chunk.

    The backward allocates one tensor, the logits' gradient (in the logits' dtype and shape), zeroes the
    positions outside the scored window (none when start == 0 and the tokens cover every position) and writes
    each chunk's gradient into it in place: no padded or reshaped copy of a (B, T, V) tensor. With `in_place`
    it allocates nothing of that size: each chunk's gradient overwrites the chunk of the saved logits it was
    computed from, and the logits' storage is returned as their gradient (the logits are garbage afterwards).
    """

    @staticmethod
    def forward(
        ctx,
        logits3d: Tensor,
        tokens2d: Tensor,
        start: int,
        temperature: float,
        rows: int,
        want_entropy: bool,
        in_place: bool,
    ):
        logp, ent = _chunked_forward(logits3d, tokens2d, start, temperature, rows, want_entropy)
        ctx.save_for_backward(logits3d, tokens2d)
        ctx.in_place = in_place
        ctx.start = start
        ctx.temperature = temperature
        ctx.rows = rows
        if ent is None:
            ent = torch.empty(0, dtype=logp.dtype, device=logits3d.device)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor, _grad_ent: Tensor | None):
        logits3d, tokens2d = ctx.saved_tensors
        inv_t = 1.0 / float(ctx.temperature)
        start = ctx.start
        seqs, pos = tokens2d.shape
        ct = _compute_dtype(logits3d)
        if ctx.in_place:
            grad = logits3d.detach()  # same storage: every chunk is read before it is overwritten
        else:
            grad = torch.empty(logits3d.shape, dtype=logits3d.dtype, device=logits3d.device)
        grad[:, :start].zero_()
        grad[:, start + pos :].zero_()
        g_out = grad_logp.to(ct) * inv_t
        for s0, s1, p0, p1 in _blocks(seqs, pos, ctx.rows):
            # d logp / d logits = (onehot(token) - softmax(logits / T)) / T, scaled by the incoming gradient.
            g = _scaled_chunk(logits3d[s0:s1, start + p0 : start + p1], inv_t, ct, torch.softmax)
            go = g_out[s0:s1, p0:p1, None]
            g.mul_(-go)
            g.scatter_add_(-1, tokens2d[s0:s1, p0:p1, None], go)
            grad[s0:s1, start + p0 : start + p1] = g
            del g
        return grad, None, None, None, None, None, None


def _as_3d(logits: Tensor, flat: bool) -> Tensor:
    """(S, L, V) view of `logits` without copying where strides allow: (1, N, V) over all positions when
    `flat` and the leading dimensions merge, else (prod(leading[:-1]), L, V); a copy only for inputs whose
    outer leading dimensions cannot merge (e.g. a strided 4-D slice)."""
    vocab = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, vocab)
    if flat:
        try:
            return logits.view(1, -1, vocab)
        except RuntimeError:
            pass
    try:
        return logits.view(-1, logits.shape[-2], vocab)
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-2], vocab)


def _run(
    logits: Tensor,
    tokens: Tensor | None,
    temperature: float,
    chunk_size: int | None,
    want_entropy: bool,
    start: int = 0,
    in_place_backward: bool = False,
):
    """View as (S, L, V), dispatch to the autograd Function when a gradient is needed, reshape back."""
    _check(logits, tokens, temperature, start)
    rows = _rows_per_chunk(chunk_size, logits.shape[-1])
    flat = start == 0 and (tokens is None or tokens.shape == logits.shape[:-1])
    out_shape = logits.shape[:-1] if flat else tokens.shape
    x = _as_3d(logits, flat)
    if tokens is None:
        _, ent = _chunked_forward(x, None, 0, temperature, rows, True)
        return None, ent.reshape(out_shape)
    tokens2d = tokens.reshape(x.shape[0], x.shape[1] if flat else tokens.shape[-1]).long()
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, ent = _TokenLogprobs.apply(
            x, tokens2d, int(start), float(temperature), rows, want_entropy, bool(in_place_backward)
        )
    else:
        logp, ent = _chunked_forward(x, tokens2d, int(start), temperature, rows, want_entropy)
    return logp.reshape(out_shape), (ent.reshape(out_shape) if want_entropy else None)


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    start: int = 0,
    in_place_backward: bool = False,
) -> Tensor:
    """Log-probability of each token under softmax(logits / temperature), shape of `tokens`.

    logits: (..., V) in any float dtype and any strides (strided views are read in place, not copied);
    tokens: (...) integer ids in [0, V). With `start` (or tokens shorter than the logits along dim -2),
    logits (..., L, V) score tokens (..., R) by position: tokens[..., j] under logits[..., start + j, :], so a
    caller holding logits of a whole sequence scores a window of it without slicing (the gradient is then one
    (..., L, V) tensor, zero outside the window, instead of a slice's gradient plus its zero-padded copy).
    Rows are processed `chunk_size` at a time (default: enough rows for ~32 MiB of float32 per temporary).
    The result is float32 (float64 for float64 logits). Differentiable with respect to `logits`; the gradient
    comes back in the logits' dtype. `in_place_backward=True` writes that gradient over the logits' own
    storage instead of a new tensor (saves one logits-sized allocation): only for logits nothing else reads
    after this backward, e.g. a model output private to the caller; a second backward through them raises.
    """
    return _run(
        logits, tokens, temperature, chunk_size, want_entropy=False, start=start, in_place_backward=in_place_backward
    )[0]


def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy (nats) of softmax(logits / temperature) per position, shape logits.shape[:-1], float32
    (float64 for float64 logits).

    A diagnostic: computed without gradient.
    """
    return _run(logits, None, temperature, chunk_size, want_entropy=True)[1]


def token_logprobs_and_entropy(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    start: int = 0,
    in_place_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """(token_logprobs, token_entropy) in one pass over the logits, both shaped like `tokens` (see
    token_logprobs for `start` and `in_place_backward`); only the log-probs carry a gradient."""
    logp, ent = _run(
        logits, tokens, temperature, chunk_size, want_entropy=True, start=start, in_place_backward=in_place_backward
    )
    return logp, ent
