"""The fast causal Kalman filter (spec section 2) against the plain per-token recursion shipped next to it."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kpo_lightning.algorithms.kalman import causal_kalman_filter, gains, kalman_filter_reference

QV_VALUES = [1e-10, 1e-6, 1e-3, 1.0, 1e2]


def reference_filter(
    z: torch.Tensor, mask: torch.Tensor, q: float, v: float, p0: float = 0.0, x0: float = 0.0
) -> torch.Tensor:
    """The spec's recursion (`algorithms.kalman.kalman_filter_reference`) of these inputs, kept in float64."""
    return kalman_filter_reference(z.double(), mask, q, v, p0, x0)


def random_mask(g: torch.Generator, B: int, T: int, holes: bool) -> torch.Tensor:
    """Right-padded rows of random length (some empty, some full, one of length 1), optionally with holes."""
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0
    lengths[1 % B] = T
    lengths[2 % B] = min(1, T)
    mask = torch.arange(T) < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.3
    return mask


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, x0: float = 0.0) -> None:
    """Errors relative to the largest magnitude entering the sums (|rho| or |x0|): ~1e-13 in float64, ~1e-7 in
    float32 (its own rounding).

    A plain rtol on each element would be meaningless where rho crosses 0 by cancellation; and where a large x0
    is cancelled to a small rho (hypothesis found rho ~2e-3 from x0 = -1.67, error 1.9e-8), the rounding is
    relative to x0, not to rho.
    """
    assert torch.isfinite(out).all()
    assert (out[~mask.bool()] == 0).all()
    rel = 1e-12 if out.dtype == torch.float64 else 2e-6
    err, size = float((out.double() - ref).abs().max()), max(float(ref.abs().max()), abs(x0))
    assert err <= rel * size, (err, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qv", QV_VALUES)
@pytest.mark.parametrize("holes", [False, True])
def test_matches_reference(dtype: torch.dtype, qv: float, holes: bool) -> None:
    """Random rows of several lengths, empty / full / length-1 rows, NaN at masked places, p0, x0 != 0."""
    g = torch.Generator().manual_seed(QV_VALUES.index(qv) + 10 * holes)
    for T in (1, 7, 64, 301):
        z = (torch.randn(9, T, generator=g) * 0.5 + 0.05).to(dtype)
        mask = random_mask(g, 9, T, holes)
        z[~mask] = float("nan")  # masked inputs may be garbage; they must not leak
        q, v, p0, x0 = 2.0 * qv, 2.0, 0.7, -0.3
        out = causal_kalman_filter(z, mask, q, v, p0=p0, x0=x0)
        assert out.dtype == dtype and out.shape == z.shape
        assert_close_to_reference(out, reference_filter(z, mask, q, v, p0, x0), mask)


@functools.cache
def long_rows(qv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 65,536-token rows (one with every third token masked and right padding) and their reference."""
    g = torch.Generator().manual_seed(1)
    T = 65_536
    z = torch.randn(2, T, generator=g, dtype=torch.float64) * 0.5 + 0.1
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, ::3] = False
    mask[1, -100:] = False
    return z, mask, reference_filter(z, mask, qv, 1.0, 0.3, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qv", QV_VALUES)
def test_long_rows_exact_and_finite(dtype: torch.dtype, qv: float) -> None:
    """65,536-token rows: where the released closed form overflows, ours stays exact."""
    z, mask, ref = long_rows(qv)
    out = causal_kalman_filter(z.to(dtype), mask, qv, 1.0, p0=0.3, x0=0.2)
    if dtype == torch.float32:
        ref = reference_filter(z.float(), mask, qv, 1.0, 0.3, 0.2)  # the reference of the rounded input
    assert_close_to_reference(out, ref, mask)


@pytest.mark.parametrize("T", [16, 17, 256, 257, 2049, 4097, 6400])
def test_lengths_around_block_and_level_boundaries(T: int) -> None:
    """The scan's blocks (16), levels and cached power-of-two plans cut lengths in different places."""
    g = torch.Generator().manual_seed(T)
    z = torch.randn(3, T, generator=g, dtype=torch.float64)
    for holes in (False, True):
        mask = random_mask(g, 3, T, holes)
        out = causal_kalman_filter(z, mask, 1e-2, 1.0, p0=0.5, x0=0.3)
        assert_close_to_reference(out, reference_filter(z, mask, 1e-2, 1.0, 0.5, 0.3), mask)


def test_defaults_and_mask_dtypes() -> None:
    """Default p0 = x0 = 0; float and integer masks mean the same as bool masks."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 50, generator=g, dtype=torch.float64)
    mask = random_mask(g, 4, 50, holes=True)
    ref = reference_filter(z, mask, 1e-3, 1.0)
    for m in (mask, mask.float(), mask.long()):
        torch.testing.assert_close(causal_kalman_filter(z, m, 1e-3, 1.0), ref, rtol=0, atol=1e-13)


def test_non_contiguous_inputs_and_repeated_calls() -> None:
    """Strided inputs work, and a later call never changes an earlier result (no shared buffers)."""
    g = torch.Generator().manual_seed(5)
    z_wide = torch.randn(6, 140, generator=g, dtype=torch.float64)
    z, mask = z_wide[:, ::2], random_mask(g, 6, 70, holes=True)
    mask_t = mask.t().contiguous().t()  # same values, column-major strides
    first = causal_kalman_filter(z, mask_t, 1e-2, 1.0)
    kept = first.clone()
    torch.testing.assert_close(first, reference_filter(z, mask, 1e-2, 1.0), rtol=0, atol=1e-13)
    causal_kalman_filter(torch.randn(6, 70, dtype=torch.float64), torch.ones(6, 70), 1e-2, 1.0)
    causal_kalman_filter(torch.randn(6, 70, dtype=torch.float64), mask, 1e-2, 1.0)
    assert torch.equal(first, kept)


@pytest.mark.parametrize("holes", [False, True])
def test_row_groups(monkeypatch: pytest.MonkeyPatch, holes: bool) -> None:
    """On CPU, rows go in groups that share scratch buffers; every group comes out right."""
    import kpo_lightning.algorithms.kalman as kalman

    monkeypatch.setattr(kalman, "_PADDED_GROUP_TOKENS", 3 * 50)  # groups of 3 rows
    monkeypatch.setattr(kalman, "_HOLEY_GROUP_TOKENS", 3 * 50)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(8, 50, generator=g, dtype=torch.float64)
    mask = random_mask(g, 8, 50, holes=holes)
    out = causal_kalman_filter(z, mask, 1e-3, 1.0, x0=0.1)
    torch.testing.assert_close(out, reference_filter(z, mask, 1e-3, 1.0, 0.0, 0.1), rtol=0, atol=1e-13)


def test_non_finite_valid_input_stays_in_its_row() -> None:
    """A NaN among a row's valid inputs spoils that row only, and nothing of it leaks into later calls."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 300, generator=g, dtype=torch.float64)
    mask = random_mask(g, 4, 300, holes=True)
    mask[3] = True
    z_nan = z.clone()
    z_nan[3, 150] = float("nan")
    out = causal_kalman_filter(z_nan, mask, 1e-3, 1.0)
    ref = reference_filter(z, mask, 1e-3, 1.0)
    torch.testing.assert_close(out[:3], ref[:3], rtol=0, atol=1e-13)
    assert torch.isnan(out[3, 150:]).all()
    for m in (mask, torch.ones_like(mask)):  # later calls: holes, and right padding
        torch.testing.assert_close(
            causal_kalman_filter(z, m, 1e-3, 1.0), reference_filter(z, m, 1e-3, 1.0), rtol=0, atol=1e-13
        )


def test_reference_by_hand() -> None:
    """The reference against the recursion worked out on paper: q = v = 1, p0 = 0, a hole at position 1.

    K_1 = 1/2, P_1 = 1/2; K_2 = 1.5/2.5 = 0.6 (the hole holds rho and P): rho = [z0/2, 0, 0.4 rho_1 + 0.6 z2]."""
    z = torch.tensor([[2.0, float("nan"), -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    expected = torch.tensor([[1.0, 0.0, 0.4 * 1.0 + 0.6 * -1.0]], dtype=torch.float64)
    torch.testing.assert_close(kalman_filter_reference(z, mask, 1.0, 1.0), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(causal_kalman_filter(z, mask, 1.0, 1.0), expected, rtol=0, atol=1e-15)
    out32 = kalman_filter_reference(z.float(), mask, 1.0, 1.0, x0=0.5)  # x0 = 0.5: rho_1 = 0.5 * 0.5 + 0.5 * 2
    assert out32.dtype == torch.float32 and out32[0, 0].item() == 1.25
    assert kalman_filter_reference(torch.randn(0, 5), torch.ones(0, 5), 1e-6, 1.0).shape == (0, 5)
    assert kalman_filter_reference(torch.randn(2, 0), torch.ones(2, 0), 1e-6, 1.0).shape == (2, 0)


def test_all_masked_and_empty_shapes() -> None:
    z = torch.randn(3, 10)
    assert (causal_kalman_filter(z, torch.zeros(3, 10, dtype=torch.bool), 1e-6, 1.0, x0=0.5) == 0).all()
    assert causal_kalman_filter(torch.randn(0, 5), torch.ones(0, 5), 1e-6, 1.0).shape == (0, 5)
    assert causal_kalman_filter(torch.randn(2, 0), torch.ones(2, 0), 1e-6, 1.0).shape == (2, 0)


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The gap between neighbouring bfloat16 numbers at |x| (8 significant bits), floored at |x| = 2**-10 so that
    values near 0 are judged on an absolute scale."""
    return 2.0 ** (torch.floor(torch.log2(x.abs().clamp(min=2**-10))) - 7)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("q", [1e-4, 1e-2, 1.0])
def test_half_precision_input_keeps_dtype_and_is_computed_in_float32(q, holes) -> None:
    """bf16 log-ratios are filtered in float32 and only the result is rounded to bf16: the output is the exact
    filter of the bf16 inputs, correctly rounded. Measured max error 0.50 bf16 spacings (that rounding) over 20
    seeds; the bound of 1 spacing is a 2x margin. Running the scan in bf16 instead gives 39-237 spacings."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 200, generator=g) * 2).bfloat16()
    mask = random_mask(g, 3, 200, holes=holes) if holes else torch.ones(3, 200, dtype=torch.bool)
    out = causal_kalman_filter(z, mask, q, 1.0)
    assert out.dtype == torch.bfloat16
    ref = reference_filter(z, mask, q, 1.0)
    err = (out.double() - ref).abs() / bf16_spacing(ref)
    assert err.max() <= 1.0, float(err.max())


def test_causal() -> None:
    """Changing z at positions > t never changes rho at positions <= t."""
    g = torch.Generator().manual_seed(3)
    B, T = 5, 200
    z = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = random_mask(g, B, T, holes=True)
    base = causal_kalman_filter(z, mask, 1e-2, 1.0)
    for t in (0, 31, 32, 33, 100, 198):
        z2 = z.clone()
        z2[:, t + 1 :] = torch.randn(B, T - t - 1, generator=g, dtype=torch.float64) * 100
        out = causal_kalman_filter(z2, mask, 1e-2, 1.0)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])


def test_rows_are_independent() -> None:
    """Each response is filtered from a fresh start: a row's output does not depend on other rows."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 90, generator=g, dtype=torch.float64)
    mask = random_mask(g, 6, 90, holes=True)
    full = causal_kalman_filter(z, mask, 1e-3, 1.0)
    for b in range(6):
        torch.testing.assert_close(
            causal_kalman_filter(z[b : b + 1], mask[b : b + 1], 1e-3, 1.0)[0], full[b], rtol=0, atol=1e-14
        )


def test_no_gradient() -> None:
    z = torch.randn(3, 20, requires_grad=True)
    mask = torch.ones(3, 20)
    out = causal_kalman_filter(z, mask, 1e-3, 1.0)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):
        out.sum().backward()  # nothing to differentiate: the filter is a constant target
    loss = (out * z).sum()  # the gradient reaches z only through the un-filtered factor
    loss.backward()
    torch.testing.assert_close(z.grad, out)


def test_gain_values() -> None:
    """Q/V = 1e-6, P0 = 0: K_1 = 1e-6/(1 + 1e-6); by t = 4096 the gain is about 1e-3 (spec section 2)."""
    K = gains(1e-6, 1.0, 4096)
    assert K[0].item() == pytest.approx(1e-6 / (1 + 1e-6), rel=1e-14)
    P, ref = 0.0, []
    for _ in range(4096):
        p_pred = P + 1e-6
        k = p_pred / (p_pred + 1.0)
        P = (1 - k) * p_pred
        ref.append(k)
    torch.testing.assert_close(K, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    assert 5e-4 < K[-1].item() < 1.5e-3  # "about 1e-3"
    assert (K[1:] > K[:-1]).all()  # climbs monotonically from P0 = 0
    # gains scale-invariant in (Q, V, P0): only the ratios matter
    torch.testing.assert_close(gains(3e-6, 3.0, 4096), K, rtol=1e-12, atol=0)


@pytest.mark.parametrize("qv", [1e-8, 1e-6, 1e-4])
def test_steady_state_gain(qv: float) -> None:
    """K_inf solves K^2 + qv K - qv = 0, about sqrt(Q/V) for small Q/V."""
    K = gains(qv, 1.0, 1 << 20)[-1].item()
    exact = (-qv + math.sqrt(qv * qv + 4 * qv)) / 2
    assert K == pytest.approx(exact, rel=1e-6)
    assert K == pytest.approx(math.sqrt(qv), rel=2 * math.sqrt(qv))


def test_rejects_bad_noise() -> None:
    z, m = torch.randn(1, 4), torch.ones(1, 4)
    for q, v, p0 in [(-1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, float("nan"), 0.0), (1.0, 1.0, -1.0)]:
        with pytest.raises(ValueError):
            causal_kalman_filter(z, m, q, v, p0=p0)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    B=st.integers(1, 4),
    T=st.integers(1, 150),
    log10_qv=st.floats(-10, 2),
    p0=st.floats(0, 5),
    x0=st.floats(-2, 2),
    hole_p=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(
    dtype: torch.dtype, B: int, T: int, log10_qv: float, p0: float, x0: float, hole_p: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, generator=g) * 2).to(dtype)
    mask = torch.rand(B, T, generator=g) >= hole_p
    q = 10.0**log10_qv
    out = causal_kalman_filter(z, mask, q, 1.0, p0=p0, x0=x0)
    assert_close_to_reference(out, reference_filter(z, mask, q, 1.0, p0, x0), mask, x0)
