"""Online causal Kalman filter over token log-ratios (KPO, arXiv 2602.10609, spec section 2).

Each row's valid tokens z are filtered in order from a fresh start (rho = x0, P = p0):

    P- = P + Q;   K = P- / (P- + V);   rho = (1 - K) rho + K z;   P = (1 - K) P-

`kalman_filter_reference` is exactly that loop: read it first. `causal_kalman_filter`, the one training uses,
gives the same numbers, faster: an exact chunked matmul scan with no loop over tokens (explained below).
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import Tensor


def qv_from_tau(tau: float, ref_length: float) -> float:
    """Q/V = (tau / L)^2: the noise ratio whose filter reaches tau = L * sqrt(Q/V) at length L (issue 19).

    With P0 = 0 the filtered value of a constant log-ratio m is m * (1 - sech(t * sqrt(Q/V))) at token t, so tau
    is the one number that says how much of a drift the filtered ratio carries by the response's end.
    """
    return (tau / ref_length) ** 2


def tau_at(length: float, q: float, v: float) -> float:
    """tau = length * sqrt(Q/V): the filter's reach at `length` tokens (the inverse of `qv_from_tau`)."""
    return length * math.sqrt(q / v)


def constant_drift_weights(q: float, v: float, n: int, p0: float = 0.0) -> Tensor:
    """w_1..w_n (float64): the filtered value at valid rank k of a constant input 1 (x0 = 0), from the gains alone.

    The recursion rho_k = (1 - K_k) rho_{k-1} + K_k on a constant input of 1 gives rho_k = 1 - prod_{j<=k} (1 - K_j),
    computed here from the real gain schedule (close to 1 - sech(k * sqrt(Q/V)) when P0 = 0): the share of a
    constant drift of the log-ratio that the filtered ratio carries at token k.
    """
    _check_noise(q, v, p0)
    log_a = _gain_schedule(q / v, p0 / v, _pow2(n))[0][:n]
    return -torch.expm1(torch.cumsum(log_a, 0))


def mean_filter_weight(mask: Tensor, q: float, v: float, p0: float = 0.0) -> Tensor:
    """The mean of `constant_drift_weights` over the valid tokens of mask (B, T), each at its rank in its row.

    Ranks count valid tokens only (the filter skips masked ones). A 0-d float64 tensor on mask's device; 0 for
    a mask with no valid token.
    """
    counts = mask.bool().sum(-1)
    cumulative = torch.cumsum(constant_drift_weights(q, v, mask.shape[-1], p0), 0)
    cumulative = torch.cat([cumulative.new_zeros(1), cumulative]).to(mask.device)  # [0] = no token
    return cumulative[counts].sum() / counts.sum().clamp_min(1)


@torch.no_grad()
def kalman_filter_reference(
    log_ratio: Tensor, mask: Tensor, q: float, v: float, p0: float = 0.0, x0: float = 0.0
) -> Tensor:
    """Filtered log-ratio rho (B, T), one row and one valid token at a time, computed in float64.

    Same arguments and result as `causal_kalman_filter`: masked tokens are skipped (the state is held
    across them) and output 0; the result has log_ratio's dtype. Slow: for reading and for tests.
    """
    _check_noise(q, v, p0)
    z, keep = log_ratio.detach().double().tolist(), mask.bool().tolist()
    out = [[0.0] * len(row) for row in z]
    for b, row in enumerate(z):
        rho, P = x0, p0  # every row (response) starts fresh
        for t, z_t in enumerate(row):
            if keep[b][t]:
                P_pred = P + q  # predict: the true log-ratio drifts by process noise q
                K = P_pred / (P_pred + v)  # gain: how far to trust this token's observation z_t
                rho = (1 - K) * rho + K * z_t  # update
                P = (1 - K) * P_pred
                out[b][t] = rho
    return torch.tensor(out, dtype=torch.float64).reshape(log_ratio.shape).to(log_ratio.device, log_ratio.dtype)


# ------------------------------------------------------------------------------------ the fast path
#
# Because Q and V are constants, the gain K depends only on Q/V, P0/V and the rank of the token among
# the row's valid tokens, never on the data. So every row shares one gain schedule and the filter is
# the linear recurrence ``rho_k = a_k rho_{k-1} + b_k z_k`` (a = 1 - K, b = K) over ranks. We run it as
# an exact hierarchical chunked scan, with no loop over tokens:
#
# 1. ranks are cut into blocks of C = 16; inside block n, ``rho = L_n z + d_n * rho_before_block`` with
#    ``L_n[i, j] = b_j prod_{u=j+1..i} a_u`` and ``d_n[i] = prod_{u<=i} a_u`` -- one batched matmul
#    gives every block's states from a zero start;
# 2. the state entering each block obeys the same kind of recurrence over the block ends (a = the
#    block's product of a, b = 1), solved the same way on 16x fewer elements, down to one dense block.
#
# All operator entries are products of factors in (0, 1], built in float64 as exp of sums of
# log(1 - K) (sums of same-sign terms, so no cancellation and no division by a vanishing cumulative
# product; entries that underflow are correctly 0). The released closed form overflows; this does not,
# for any Q/V from 1e-10 to 1e2 and rows of any length.
#
# Masked tokens are skipped (holes anywhere, not only right padding): valid tokens are compacted to
# the left of their row, filtered, and gathered back; masked outputs are 0. No gradient flows.
# Masked inputs may hold anything (NaN included). A NaN or inf among a row's *valid* inputs spoils that
# row's outputs, also before it (never other rows); the raw ratio makes the loss non-finite then anyway.

# On CPU, rows are filtered in groups of about this many tokens (bounds the scratch memory, see _scratch;
# the sizes that ran fastest on a 2-core machine: the compaction for holes is memory-bound)
_PADDED_GROUP_TOKENS = 1 << 20
_HOLEY_GROUP_TOKENS = 1 << 19
_BLOCK = 16  # block length of the chunked scan at every level
_DENSE = 128  # the coarsest level is one dense block of at most this many block ends
_scratch_store = threading.local()


def _scratch(
    slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zeroed: bool = False
) -> Tensor:
    """A temporary of the given shape, reused across calls on CPU; zero-filled when first made if zeroed.

    Fresh multi-megabyte CPU allocations are often returned to the OS on free and page-fault back in
    on first touch, which costs more than the filter's arithmetic; keeping one buffer per slot, thread
    and dtype avoids that. They hold about 28 bytes per token of a row group (see _HOLEY_GROUP_TOKENS)
    plus 4 per token of the largest batch: some 30 MB for 256 x 4096. Other devices have caching
    allocators and get a fresh tensor every time.
    """
    if device.type != "cpu":
        return (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffers = _scratch_store.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, dtype)] = (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _drop_scratch(slot: str, dtype: torch.dtype) -> None:
    """Forget a scratch buffer, so that the next call makes a fresh one."""
    _scratch_store.__dict__.get("buffers", {}).pop((slot, dtype), None)


@functools.lru_cache(maxsize=8)
def _gain_schedule(qv: float, p0v: float, n: int) -> tuple[Tensor, Tensor]:
    """Float64 CPU tensors (log a_k, b_k) for ranks k = 0..n-1, with a = 1 - K and b = K.

    With V normalised to 1, the posterior variance after an update equals the gain (P_t / V = K_t),
    so the recursion is s = P + Q/V, a = 1 / (s + 1), b = s a, next P = b. Writing a as 1/(s+1) and
    log a as -log1p(s) keeps both exact when K is near 1 (large Q/V) or near 0 (tiny Q/V).
    """
    log_a = [0.0] * n
    b = [0.0] * n
    p = p0v
    for k in range(n):
        s = p + qv
        a_k = 1.0 / (s + 1.0)
        log_a[k] = -math.log1p(s)
        b[k] = p = s * a_k
    return torch.tensor(log_a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def gains(q: float, v: float, n: int, p0: float = 0.0) -> Tensor:
    """The Kalman gains K_1..K_n (float64) for noise variances q, v and prior variance p0."""
    _check_noise(q, v, p0)
    return _gain_schedule(q / v, p0 / v, _pow2(n))[1][:n].clone()


def _pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1): cache key granularity for schedule lengths."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _segment_log_products(log_a: Tensor) -> Tensor:
    """For rows of log-factors (..., C): out[..., i, j] = sum_{u=j+1..i} log_a[u] for j <= i, else -inf.

    Built as a reversed cumulative sum of same-sign terms, so each entry is accurate to its own size.
    """
    C = log_a.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool).tril()
    # x[..., i, u] = log_a[u] for u <= i; out[..., i, j] = sum_{u > j} x[..., i, u]
    x = torch.where(lower, log_a.unsqueeze(-2), 0.0)
    suffix = x.flip(-1).cumsum(-1).flip(-1)  # suffix[..., i, j] = sum_{u >= j} x[..., i, u]
    within = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    return within.masked_fill(~lower, float("-inf"))


def _block_operators(log_a: Tensor, b: Tensor, inclusive: bool) -> tuple[Tensor, Tensor]:
    """Per block (float64), the map from the block's inputs and entering state to its states.

    For a recurrence s_i = a_i s_{i-1} + b_i u_i cut into blocks (log_a, b: (nb, C)), the states inside
    block n are L[n] @ u_block + d[n] * s_entering, with L[n][i, j] = b_j prod_{u=j+1..i} a_u (j <= i)
    and d[n][i] = prod_{u<=i} a_u. With inclusive=False they are instead the states *before* each
    element (rows shifted down by one: s_{i-1}), which is what a coarser level hands to a finer one,
    and L gets one more row, the block's own end state (from a zero start), for the next level down.
    """
    L = torch.exp(_segment_log_products(log_a)) * b.unsqueeze(-2)
    d = torch.exp(log_a.cumsum(-1))
    if not inclusive:
        L = torch.cat([torch.zeros_like(L[:, :1]), L], dim=1)  # rows: s_{-1}..s_{C-1}, zero start
        d = torch.cat([torch.ones_like(d[:, :1]), d[:, :-1]], dim=1)
    return L, d


@functools.lru_cache(maxsize=8)
def _scan_plan(
    qv: float, p0v: float, width: int, C: int, dtype: torch.dtype, device: torch.device
) -> tuple[tuple[Tensor, Tensor], ...]:
    """Operators of the hierarchical scan over ranks 0..width-1, cast to (dtype, device).

    Level 0 cuts the ranks into blocks of C and gives the filtered values (inclusive). Each further
    level runs the same recurrence over the previous level's block ends -- a_n = the block's product of
    a, b_n = 1 -- in blocks of _BLOCK, and gives the state entering each block (exclusive); the last
    level is a single dense block of at most _DENSE elements. Level 0 is (LT, d) with LT = L^T and d
    shaped (nb, 1, C) for the row-major batch; deeper levels are (L, d) with d shaped (nb, C, 1).
    Every operator depends on positions only, so leading blocks (and the leading corner of the last
    dense block) serve any shorter length: one plan per power-of-two width is enough.
    """
    log_a, b = _gain_schedule(qv, p0v, _pow2(width))
    log_a, b = log_a[:width], b[:width]
    levels = []
    while True:
        nb = log_a.numel() // C
        L, d = _block_operators(log_a.view(nb, C), b.view(nb, C), inclusive=not levels)
        if not levels:
            levels.append((L.transpose(1, 2).contiguous(), d.unsqueeze(1)))
        else:
            levels.append((L if nb > 1 else L[:, :C], d.unsqueeze(2)))  # the last level has no next one
        if nb == 1:
            break
        # next level: the block ends, padded with neutral steps (a = 1, b = 0) to whole blocks
        C = nb if nb <= _DENSE else _BLOCK
        n = _round_up(nb, C)
        log_a = torch.cat([log_a.view(nb, -1).sum(1), log_a.new_zeros(n - nb)])
        b = torch.cat([b.new_ones(nb), b.new_zeros(n - nb)])
    return tuple((L.to(dtype=dtype, device=device), d.to(dtype=dtype, device=device)) for L, d in levels)


@functools.lru_cache(maxsize=8)
def _count_weights(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Rows 1, 1, ..., 1 and 1, 3, 5, ..., 2T-1: a (2, T) tensor (cached: used on every call)."""
    return torch.stack([torch.ones(T, dtype=dtype), torch.arange(1, 2 * T, 2, dtype=dtype)]).to(device)


def _scan(buf: Tensor, plan: tuple[tuple[Tensor, Tensor], ...], x0: float, out: Tensor) -> None:
    """Write into out (R, width) the rows of buf (R, width) filtered from rank 0. buf must be finite.

    width is a multiple of the plan's block length. buf and out may be row-strided views, and may be
    the same memory (buf is read only by the bmm).
    """
    LT, d = plan[0]
    C = LT.shape[1]
    R, width = buf.shape
    nb = width // C
    y = _scratch("y", (nb, R, C), buf.dtype, buf.device)
    torch.bmm(buf.view(R, nb, C).transpose(0, 1), LT[:nb], out=y)  # (nb, R, C): blocks from a zero start
    out_blocks = out.view(R, nb, C).transpose(0, 1)
    if nb == 1:
        torch.add(y, d[:1], alpha=x0, out=out_blocks)
    else:
        entering = _entering_states(y[:, :, C - 1], plan[1:], x0)  # (nb, R)
        torch.addcmul(y, d[:nb], entering.unsqueeze(-1), out=out_blocks)


def _entering_states(ends: Tensor, plan: tuple[tuple[Tensor, Tensor], ...], x0: float) -> Tensor:
    """The state entering each block (n, R), from the blocks' local end states ends (n, R) (column per row).

    Same scheme one level down, on C-times fewer elements: blocks of the block ends.
    """
    L, d = plan[0]
    n, R = ends.shape
    if L.shape[0] == 1:  # the last level: the leading n x n corner of one dense block
        return torch.mm(L[0, :n, :n], ends).add_(d[0, :n], alpha=x0)
    C = d.shape[1]
    nb = -(-n // C)
    if nb * C != n:
        ends = torch.nn.functional.pad(ends, (0, 0, 0, nb * C - n))
    y = torch.bmm(L[:nb], ends.reshape(nb, C, R))  # states before each element, and each block's end
    states = y[:, :C].addcmul_(d[:nb], _entering_states(y[:, C, :], plan[1:], x0).unsqueeze(1))
    return states.reshape(nb * C, R)[:n]


def _is_right_padded(mf: Tensor) -> bool:
    """True iff every row of the 0/1 mask mf (B, T) is valid exactly on a prefix.

    A row with n valid tokens has sum_t m_t (2t + 1) >= 1 + 3 + ... + (2n - 1) = n^2, with equality
    only when the valid tokens are the first n. One matmul gives n and that sum for every row, exactly:
    every partial sum is an integer below 2**24 (float32, T <= 4096) or 2**53 (float64).
    """
    T = mf.shape[1]
    if T > 4096 and mf.dtype != torch.float64:
        mf = mf.double()
    n, weighted = torch.mm(_count_weights(T, mf.dtype, mf.device), mf.t())
    return torch.equal(weighted, n * n)


def _filter_padded_rows(z: Tensor, mf: Tensor, plan: tuple[tuple[Tensor, Tensor], ...], x0: float, out: Tensor) -> None:
    """Right-padded rows z (R, T) with 0/1 float mask mf into out (R, T, contiguous); z must be finite.

    Rank = position, and the masked inputs come after every valid one, so they reach only masked
    outputs, which the final multiply zeroes.
    """
    R, T = z.shape
    width = _round_up(T, plan[0][0].shape[1])  # T rounded up to whole blocks
    if width == T:
        _scan(z, plan, x0, out)
        out.mul_(mf)
        return
    padded = _scratch("buf", (R, width), z.dtype, z.device, zeroed=True)  # see _filter_holey_rows
    padded[:, :T].copy_(z)
    padded[:, T:].zero_()
    _scan(padded, plan, x0, padded)
    torch.mul(padded[:, :T], mf, out=out)


def _filter_holey_rows(z: Tensor, m8: Tensor, plan: tuple[tuple[Tensor, Tensor], ...], x0: float, out: Tensor) -> None:
    """Rows z (R, T) with masked tokens anywhere (0/1 uint8 mask m8) into out (R, T, contiguous).

    One buffer per row, [J junk slots | scan slots]. Valid tokens go to slot J + rank (rank = count - 1),
    masked ones to slot count <= T < J, so no two valid tokens collide. Scan in place, zero the junk,
    and gather back with the same slots: valid tokens read their rho, masked ones read 0.
    """
    R, T = z.shape
    width = _round_up(T, plan[0][0].shape[1])
    J = _round_up(T + 1, 16)  # keeps the scan region 64-byte aligned
    slot = _scratch("slot", (R, T), torch.int64, z.device)
    # Slots past a row's valid tokens keep what the last call left there: that only has to be finite
    # (the matmul multiplies it by 0), which causal_kalman_filter guarantees for this buffer.
    buf = _scratch("buf", (R, J + width), z.dtype, z.device, zeroed=True)
    m64 = _scratch("mask64", (R, T), torch.int64, z.device).copy_(m8)  # mixed-dtype ops make temporaries
    torch.cumsum(m64, 1, out=slot).add_(m64, alpha=J - 1)
    buf.scatter_(1, slot, z)
    buf[:, :J].zero_()  # masked inputs landed here; they may be NaN
    _scan(buf[:, J:], plan, x0, buf[:, J:])
    torch.gather(buf, 1, slot, out=out)


@torch.no_grad()
def causal_kalman_filter(
    log_ratio: Tensor, mask: Tensor, q: float, v: float, p0: float = 0.0, x0: float = 0.0
) -> Tensor:
    """Filtered log-ratio rho (B, T) in log_ratio's dtype; masked positions are skipped and output 0.

    Same numbers as `kalman_filter_reference`, faster (a chunked matmul scan, see above), computed in the
    input's dtype (half inputs in float32, rounded once at the end): tests/test_kalman.py holds every output
    within 1e-12 (float64) or 2e-6 (float32) of the largest |rho| of the batch, against the reference of the
    same input. No gradient flows: the result is a fixed target, recomputed each forward. Masked inputs may
    hold anything, NaN included; a non-finite *valid* input spoils its whole row (the reference: from that
    token on).
    """
    _check_noise(q, v, p0)
    z = log_ratio.detach()
    if z.dim() != 2 or mask.shape != z.shape:
        raise ValueError(f"log_ratio and mask must both be (B, T); got {tuple(z.shape)} and {tuple(mask.shape)}")
    out_dtype = z.dtype
    dtype = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32  # half is too coarse
    z = z.to(dtype).contiguous()
    B, T = z.shape
    out = torch.empty(B, T, dtype=dtype, device=z.device)
    if B == 0 or T == 0:
        return out.to(out_dtype)
    m8 = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    finite = bool(z.sum().isfinite())
    if not finite:
        z = torch.where(m8.bool(), z, z.new_zeros(()))  # NaN/inf padding must not meet the matmul
    C = _BLOCK if T > _BLOCK else _round_up(T, 8)
    plan = _scan_plan(float(q) / float(v), float(p0) / float(v), _pow2(_round_up(T, C)), C, dtype, z.device)
    mf = _scratch("mask", (B, T), dtype, z.device).copy_(m8)  # from uint8: bool -> float is slower
    padded = _is_right_padded(mf)
    rows = max(1, (_PADDED_GROUP_TOKENS if padded else _HOLEY_GROUP_TOKENS) // T) if z.device.type == "cpu" else B
    try:
        for i in range(0, B, rows):
            if padded:
                _filter_padded_rows(z[i : i + rows], mf[i : i + rows], plan, float(x0), out[i : i + rows])
            else:
                _filter_holey_rows(z[i : i + rows], m8[i : i + rows], plan, float(x0), out[i : i + rows])
    finally:
        if not finite:  # a NaN/inf valid input may have reached the scratch buffer: it must stay finite
            _drop_scratch("buf", dtype)
    return out.to(out_dtype)


def _check_noise(q: float, v: float, p0: float) -> None:
    """Reject noise settings for which the recursion is undefined."""
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"Kalman q (process noise variance) must be finite and >= 0, got {q}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"Kalman v (observation noise variance) must be finite and > 0, got {v}")
    if not (math.isfinite(p0) and p0 >= 0):
        raise ValueError(f"Kalman p0 (initial variance) must be finite and >= 0, got {p0}")
