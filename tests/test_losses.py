"""Policy losses against slow per-token / per-sequence loop references (values and autograd gradients)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kpo_lightning.algorithms.kalman import kalman_filter_reference
from kpo_lightning.algorithms.losses import (
    AGG_MODES,
    LOSS_DEFAULTS,
    LOSS_TYPES,
    aggregation_normalizer,
    compute_policy_loss,
    resolve_loss_options,
)
from kpo_lightning.errors import UserInputError

C_NORM = 16.0  # agg_norm_constant used with seq-mean-token-sum-norm
# The log-ratio clamps, written out (not imported) so that moving them in losses.py fails these tests: token
# log-ratios to [-20, 20] (GRPO, GMPO), rebuilt log-ratios (KPO's filtered, GSPO's sequence) to <= 10. A
# torch.clamp: beyond a bound the value is the bound's and the gradient is 0.
CLAMP_TOKEN = 20.0
CLAMP_REBUILT = 10.0


def make_batch(B=7, T=9, scale=0.3, seed=0):
    """Random batch with an empty row, a length-1 row, a full row, holes, A = 0, and large ratios for A < 0."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # empty row
    mask[1] = False
    mask[1, 4] = True  # length-1 row
    mask[2] = True  # full row
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[3] = 0.0
    adv[2] = -1.3
    old[2, 0] = logp[2, 0] - 2.0  # ratio e^2 > dual clip 3 with A < 0
    old[2, 1] = logp[2, 1] + 1.0  # ratio e^-1, below the GRPO range with A < 0
    # float32 like real log-probs, so the reference sees the very same numbers
    return logp.float().double(), old.float().double(), adv.float().double(), mask


def rows(mask):
    """Valid positions per row, in order."""
    return [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]


def token_weights(mask, agg, c=C_NORM):
    """d loss / d (per-token loss) for each valid token, as the aggregation says; a dict {(i, t): w}."""
    valid = rows(mask)
    n_seq = sum(1 for r in valid if r)
    n_tok = sum(len(r) for r in valid)
    w = {}
    for i, r in enumerate(valid):
        for t in r:
            w[(i, t)] = {
                "token-mean": 1 / n_tok,
                "seq-mean-token-mean": 1 / (len(r) * n_seq),
                "seq-mean-token-sum": 1 / n_seq,
                "seq-mean-token-sum-norm": 1 / (c * n_seq),
            }[agg]
    return w


def loop_filter(zs, q, v, p0=0.0):
    """The spec's scalar Kalman filter over one row's valid log-ratios (kalman.py's plain reference)."""
    z = torch.tensor([zs], dtype=torch.float64)
    return kalman_filter_reference(z, torch.ones_like(z, dtype=torch.bool), q, v, p0)[0].tolist()


def clip_term(r, a, lo, hi, dual):
    """Value and d value / d r (as 'is the unclipped term active') of the PPO clip for one token."""
    loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    active = not ((a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo))
    if dual and a < 0 and loss > -a * dual:
        loss, active = -a * dual, False
    return loss, active


def reference(loss_type, logp, old, adv, mask, agg="seq-mean-token-mean", **opts):
    """Loop reference: (loss value, gradient matrix w.r.t. logp) in float64 Python numbers."""
    o = {**LOSS_DEFAULTS[loss_type], **opts}
    w = token_weights(mask, agg)
    value, grad = 0.0, torch.zeros_like(logp)
    for i, r in enumerate(rows(mask)):
        if not r:
            continue
        a = float(adv[i])
        z = [float(logp[i, t] - old[i, t]) for t in r]
        if loss_type == "grpo":
            for t, zt in zip(r, z):
                inside = -CLAMP_TOKEN <= zt <= CLAMP_TOKEN  # the clamp's gradient is 0 beyond its bounds
                ratio = math.exp(min(max(zt, -CLAMP_TOKEN), CLAMP_TOKEN))
                term, active = clip_term(ratio, a, o["clip_low"], o["clip_high"], o["dual_clip"])
                value += w[(i, t)] * term
                grad[i, t] = w[(i, t)] * (-a * ratio) * active * inside
        elif loss_type == "gspo":
            seq = sum(z) / len(z)  # clamped above only: log s <= 10
            s = math.exp(min(seq, CLAMP_REBUILT))
            for t in r:
                term, active = clip_term(s, a, o["clip_low"], o["clip_high"], 0.0)
                value += w[(i, t)] * term
                grad[i, t] = w[(i, t)] * (-a * s) * active * (seq <= CLAMP_REBUILT)
        elif loss_type == "gmpo":
            lo, hi = o["clip_low"], o["clip_high"]
            ls, dls = [], []
            for zt in z:
                # the token log-ratio is clamped to [-20, 20] first; only the bound on the unclipped side
                # (below for A > 0, above for A < 0) can then be active
                if a > 0:
                    lt, dl = (hi, 0.0) if zt > hi else (-CLAMP_TOKEN, 0.0) if zt < -CLAMP_TOKEN else (zt, 1.0)
                elif a < 0:
                    lt, dl = (-lo, 0.0) if zt < -lo else (CLAMP_TOKEN, 0.0) if zt > CLAMP_TOKEN else (zt, 1.0)
                else:
                    lt, dl = 0.0, 0.0
                ls.append(lt)
                dls.append(dl)
            gm = math.exp(sum(ls) / len(ls))
            for t, dl in zip(r, dls):
                value += w[(i, t)] * (-a * gm)
                # d/dlogp_t of -A exp(mean_s l_s), in token form: every token carries -A g, its own l_t's slope
                grad[i, t] = w[(i, t)] * (-a * gm) * dl
        else:
            rho = loop_filter(z, o["kalman_q"], o["kalman_v"], o["kalman_p0"])
            for t, rt in zip(r, rho):
                rhat = math.exp(min(rt, CLAMP_REBUILT))  # clamped above only: log r_hat <= 10
                if loss_type == "kpo":
                    term, active = -a * rhat, True
                else:
                    term, active = clip_term(rhat, a, o["clip_low"], o["clip_high"], o["dual_clip"])
                value += w[(i, t)] * term
                grad[i, t] = w[(i, t)] * (-a * rhat) * active * (rt <= CLAMP_REBUILT)
    return value, grad


def ours(loss_type, logp, old, adv, mask, **opts):
    x = logp.clone().float().requires_grad_()
    loss, metrics = compute_policy_loss(loss_type, x, old.float(), adv.float(), mask, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


# Options under which the clamps can show at scale 12 (|log r| up to ~40): without the dual clip GRPO's upper
# clamp sets the loss of A < 0 tokens; with q = 1 the filtered log-ratio follows z past 10.
EXTREME_OPTS = {"grpo": {"dual_clip": 0.0}, "kpo": {"kalman_q": 1.0}, "kpo_clipped": {"kalman_q": 1.0}}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("scale", [1e-3, 0.3, 12.0])
def test_against_loop_reference(loss_type, agg, scale):
    logp, old, adv, mask = make_batch(scale=scale, seed=int(scale * 1000))
    extra = {"agg_norm_constant": C_NORM} if agg == "seq-mean-token-sum-norm" else {}
    if scale > 1:
        extra.update(EXTREME_OPTS.get(loss_type, {}))
        z = (logp - old)[mask]
        assert (z > CLAMP_TOKEN).any() and (z < -CLAMP_TOKEN).any()  # the data reaches both token clamps
    loss, grad, _ = ours(loss_type, logp, old, adv, mask, agg=agg, **extra)
    ref_value, ref_grad = reference(loss_type, logp, old, adv, mask, agg=agg, **extra)
    assert loss.item() == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert (grad[~mask] == 0).all()


# One row per case: (loss, options, advantage, token log-ratios, which tokens' gradient the clamp zeroes). Each
# bound is met 0.5 inside and 0.5 outside, so moving or removing a clamp by more than 0.5 changes a value here.
# KPO with q = 1e6: the gain is ~1 - 1e-6, so the filtered log-ratio is z to 1e-5 and crosses 10 with it.
CLAMP_CASES = [
    ("grpo", {"dual_clip": 0.0}, -1.0, [19.5, 20.5], [False, True]),  # upper token clamp, A < 0 (unclipped side)
    ("grpo", {}, 1.0, [-19.5, -20.5], [False, True]),  # lower token clamp (A > 0 keeps tiny ratios unclipped)
    ("gmpo", {}, -1.0, [19.5, 20.5], [False, True]),
    ("gmpo", {}, 1.0, [-19.5, -20.5], [False, True]),
    ("gspo", {}, -1.0, [10.5, 10.5], [True, True]),  # sequence log-ratio 10.5 > 10
    ("gspo", {}, -1.0, [9.0, 10.0], [False, False]),  # 9.5: inside
    ("gspo", {}, 1.0, [-25.0, -25.0], [False, False]),  # no lower clamp on the sequence ratio
    ("kpo", {"kalman_q": 1e6}, -1.0, [9.5, 10.5], [False, True]),
    ("kpo", {"kalman_q": 1e6}, 1.0, [-25.0, -30.0], [False, False]),  # no lower clamp on the filtered ratio
    ("kpo_clipped", {"kalman_q": 1e6}, -1.0, [9.5, 10.5], [False, True]),
]


@pytest.mark.parametrize("loss_type, opts, a, z, clamped", CLAMP_CASES)
def test_log_ratio_clamps_at_their_bounds(loss_type, opts, a, z, clamped):
    """The value is the clamped one and the gradient is exactly 0 beyond a bound (torch.clamp), nonzero inside."""
    logp = torch.full((1, len(z)), -1.0, dtype=torch.float64)
    old = logp - torch.tensor([z], dtype=torch.float64)  # exact in float32: z is what the code sees
    adv, mask = torch.tensor([a], dtype=torch.float64), torch.ones(1, len(z), dtype=torch.bool)
    loss, grad, _ = ours(loss_type, logp, old, adv, mask, **opts)
    ref_value, ref_grad = reference(loss_type, logp, old, adv, mask, **opts)
    # float32 vs the float64 loop: measured max relative error 7.1e-7 (KPO gradient, z = -30); 2e-6 is ~3x that
    assert loss.item() == pytest.approx(ref_value, rel=2e-6, abs=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-6, atol=0)
    assert grad[0][torch.tensor(clamped)].eq(0).all() and grad[0][~torch.tensor(clamped)].ne(0).all()


@pytest.mark.parametrize("loss_type", ["kpo", "kpo_clipped"])
def test_kalman_options_reach_the_filter(loss_type):
    logp, old, adv, mask = make_batch(scale=0.3, seed=11)
    opts = dict(kalman_q=0.02, kalman_v=4.0, kalman_p0=0.5)
    if loss_type == "kpo_clipped":
        opts.update(clip_low=0.01, clip_high=0.02, dual_clip=2.0)
    loss, grad, _ = ours(loss_type, logp, old, adv, mask, **opts)
    ref_value, ref_grad = reference(loss_type, logp, old, adv, mask, **opts)
    assert loss.item() == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_kpo_gradient_is_filtered_ratio_times_advantage():
    """Spec section 3: d loss / d logp_t = -A_i * r_hat_t / (n_i * num_seqs) for seq-mean-token-mean."""
    logp, old, adv, mask = make_batch(scale=0.5, seed=3)
    _, grad, metrics = ours("kpo", logp, old, adv, mask, kalman_q=1e-2)
    n_seq = int(mask.any(-1).sum())
    for i, r in enumerate(rows(mask)):
        rho = loop_filter([float(logp[i, t] - old[i, t]) for t in r], 1e-2, 1.0)
        for t, rt in zip(r, rho):
            expected = -float(adv[i]) * math.exp(rt) / (len(r) * n_seq)
            assert grad[i, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-8)
    assert metrics["ratio_var_filtered"] < metrics["ratio_var_raw"]


def test_clipped_tokens_have_zero_gradient_and_are_counted():
    logp, old, adv, mask = make_batch(scale=0.3)
    _, grad, m = ours("grpo", logp, old, adv, mask)
    ratio = (logp - old).exp()
    a = adv[:, None].expand_as(ratio)
    high = mask & (a > 0) & (ratio > 1.2)
    low = mask & (a < 0) & (ratio < 0.8)
    dual = mask & (a < 0) & (ratio > 3.0)
    assert high.any() and low.any() and dual.any()  # the batch exercises every clip
    assert (grad[high | low | dual] == 0).all()
    assert (grad[mask & ~(high | low | dual) & (a != 0)] != 0).all()
    n = mask.sum().item()
    assert m["clip_frac_high"].item() == pytest.approx(high.sum().item() / n)
    assert m["clip_frac_low"].item() == pytest.approx(low.sum().item() / n)
    assert m["clip_frac_dual"].item() == pytest.approx(dual.sum().item() / n)


def test_dual_clip_zero_disables_it():
    logp, old, adv, mask = make_batch(scale=0.3)
    loss, grad, m = ours("grpo", logp, old, adv, mask, dual_clip=0)
    ref_value, ref_grad = reference("grpo", logp, old, adv, mask, dual_clip=0.0)
    assert loss.item() == pytest.approx(ref_value, rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert grad[2, 0] != 0 and m["clip_frac_dual"] == 0


def test_gspo_and_gmpo_match_their_sequence_objectives():
    """With seq-mean-token-mean the token forms equal the sequence objectives, gradients included (autograd)."""
    logp, old, adv, mask = make_batch(scale=0.05, seed=5)
    for loss_type in ("gspo", "gmpo"):
        o = LOSS_DEFAULTS[loss_type]
        x = logp.clone().requires_grad_()
        total, n_seq = 0.0, 0
        for i, r in enumerate(rows(mask)):
            if not r:
                continue
            n_seq += 1
            a = float(adv[i])
            z = torch.stack([x[i, t] - old[i, t] for t in r])
            if loss_type == "gspo":
                s = z.mean().exp()
                total = total + torch.maximum(-a * s, -a * s.clamp(1 - o["clip_low"], 1 + o["clip_high"]))
            else:
                sgn = math.copysign(1.0, a) if a != 0 else 0.0
                clipped_z = sgn * torch.minimum(sgn * z, sgn * z.clamp(-o["clip_low"], o["clip_high"]))
                total = total - a * clipped_z.mean().exp()
        total = total / n_seq
        (ref_grad,) = torch.autograd.grad(total, x)
        loss, grad, _ = ours(loss_type, logp, old, adv, mask)
        assert loss.item() == pytest.approx(total.item(), rel=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_options_is_paper_defaults(loss_type):
    logp, old, adv, mask = make_batch(scale=0.01)
    loss, grad, m = ours(loss_type, logp, old, adv, mask)
    loss2, grad2, m2 = ours(loss_type, logp, old, adv, mask, **LOSS_DEFAULTS[loss_type])
    # the trainer forwards every config field, None meaning "the paper's value"
    nones = dict(
        clip_low=None,
        clip_high=None,
        dual_clip=None,
        kalman_q=None,
        kalman_v=None,
        kalman_p0=None,
        agg_norm_constant=None,
        normalizer=None,
        ref_logp=None,
    )
    loss3, grad3, _ = ours(loss_type, logp, old, adv, mask, **nones)
    assert loss == loss2 == loss3
    assert torch.equal(grad, grad2) and torch.equal(grad, grad3)
    assert m.keys() == m2.keys()
    has_filter = loss_type.startswith("kpo")
    assert ("ratio_mean_filtered" in m) == has_filter and ("ratio_var_filtered" in m) == has_filter
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_paper_defaults_table():
    assert LOSS_DEFAULTS["kpo_clipped"]["kalman_q"] == 1e-6 and LOSS_DEFAULTS["kpo_clipped"]["kalman_v"] == 1.0
    assert (LOSS_DEFAULTS["kpo_clipped"]["clip_low"], LOSS_DEFAULTS["kpo_clipped"]["clip_high"]) == (3e-4, 4e-4)
    assert LOSS_DEFAULTS["kpo"]["kalman_q"] == 1e-4 and "clip_low" not in LOSS_DEFAULTS["kpo"]
    assert LOSS_DEFAULTS["grpo"]["dual_clip"] == 3.0
    assert all(d["agg"] == "seq-mean-token-mean" and d["beta"] == 0 for d in LOSS_DEFAULTS.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_ratios_are_one(loss_type):
    logp, _, adv, mask = make_batch()
    loss, grad, m = ours(loss_type, logp, logp, adv, mask)
    assert m["ratio_mean_raw"] == 1 and m["ratio_var_raw"] == 0
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0 and m["clip_frac_dual"] == 0
    if loss_type.startswith("kpo"):
        assert m["ratio_mean_filtered"] == 1 and m["ratio_var_filtered"] == 0
    # every loss reduces to the policy gradient -A * grad logp at ratio 1
    n_seq = int(mask.any(-1).sum())
    expected_loss = -sum(float(adv[i]) for i, r in enumerate(rows(mask)) if r) / n_seq
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    w = token_weights(mask, "seq-mean-token-mean")
    for (i, t), wt in w.items():
        assert grad[i, t].item() == pytest.approx(-float(adv[i]) * wt, rel=1e-5, abs=1e-9)


def split_and_sum(loss_type, logp, old, adv, mask, cuts, **opts):
    """Loss and gradient summed over micro-batches cut at `cuts`, each given the full batch's normalizer."""
    agg = opts.get("agg", "seq-mean-token-mean")
    normalizer = aggregation_normalizer(agg, mask)
    x = logp.clone().float().requires_grad_()
    total = 0.0
    bounds = [0, *cuts, logp.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        extra = {k: (v[a:b] if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        loss, _ = compute_policy_loss(
            loss_type, x[a:b], old[a:b].float(), adv[a:b].float(), mask[a:b], normalizer=normalizer, **extra
        )
        total = total + loss
    (grad,) = torch.autograd.grad(total, x)
    return total, grad


@settings(max_examples=30, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    agg=st.sampled_from(AGG_MODES),
    cuts=st.lists(st.integers(1, 6), max_size=3, unique=True).map(sorted),
    token_adv=st.booleans(),
    kl=st.sampled_from([None, "k1", "k2", "k3"]),
    seed=st.integers(0, 1000),
)
def test_micro_batches_with_full_normalizer_equal_the_whole_batch(loss_type, agg, cuts, token_adv, kl, seed):
    logp, old, adv, mask = make_batch(scale=0.2, seed=seed)
    if token_adv:
        adv = adv[:, None] + 0.1 * torch.randn(mask.shape, dtype=torch.float64)
    opts = {"agg": agg, "agg_norm_constant": C_NORM}
    if kl:
        opts.update(ref_logp=(logp + 0.1 * torch.randn_like(logp)).float(), beta=0.05, kl_estimator=kl)
    whole, grad = split_and_sum(loss_type, logp, old, adv, mask, [], **opts)
    parts, grad_parts = split_and_sum(loss_type, logp, old, adv, mask, cuts, **opts)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad_parts, grad, rtol=1e-5, atol=1e-8)


def test_normalizer_counts_sequences_with_a_valid_token():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert aggregation_normalizer("seq-mean-token-mean", mask) == 2.0
    assert aggregation_normalizer("seq-mean-token-sum-norm", mask) == 2.0
    assert aggregation_normalizer("token-mean", mask) == 3.0
    with pytest.raises(UserInputError, match="bogus"):
        aggregation_normalizer("bogus", mask)


def test_normalizer_scales_the_loss_and_accepts_a_tensor():
    logp, old, adv, mask = make_batch()
    loss, grad, _ = ours("kpo", logp, old, adv, mask)
    n = aggregation_normalizer("seq-mean-token-mean", mask)
    loss2, grad2, _ = ours("kpo", logp, old, adv, mask, normalizer=2 * n)
    loss3, _, _ = ours("kpo", logp, old, adv, mask, normalizer=torch.tensor(2 * n))
    assert loss2.item() == pytest.approx(loss.item() / 2) and loss3.item() == pytest.approx(loss.item() / 2)
    torch.testing.assert_close(grad2, grad / 2)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term(estimator):
    logp, old, adv, mask = make_batch(scale=0.1)
    ref = logp + 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta = 0.3
    loss, grad, m = ours("grpo", logp, old, adv, mask, ref_logp=ref.float(), beta=beta, kl_estimator=estimator)
    pg_value, pg_grad = reference("grpo", logp, old, adv, mask)
    w = token_weights(mask, "seq-mean-token-mean")
    kl_value, kl_grad = 0.0, torch.zeros_like(logp)
    for (i, t), wt in w.items():
        d = float(logp[i, t] - ref[i, t])
        k, dk = {"k1": (d, 1.0), "k2": (0.5 * d * d, d), "k3": (math.exp(-d) + d - 1, 1 - math.exp(-d))}[estimator]
        kl_value += wt * k
        kl_grad[i, t] = wt * dk
    assert m["kl"].item() == pytest.approx(kl_value, rel=1e-4)
    assert loss.item() == pytest.approx(pg_value + beta * kl_value, rel=1e-5)
    torch.testing.assert_close(grad.double(), pg_grad + beta * kl_grad, rtol=1e-4, atol=1e-7)
    # with beta = 0 the KL is still reported but does not enter the loss
    loss0, _, m0 = ours("grpo", logp, old, adv, mask, ref_logp=ref.float(), kl_estimator=estimator)
    assert loss0.item() == pytest.approx(pg_value, rel=1e-5) and "kl" in m0
    assert "kl" not in ours("grpo", logp, old, adv, mask)[2]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nonfinite_tokens_are_dropped_and_counted(loss_type):
    logp, old, adv, mask = make_batch(scale=0.1)
    bad = torch.zeros_like(mask)
    bad[2, 3] = bad[4, int(mask[4].nonzero()[0])] = True
    assert (mask & bad).sum() == 2
    dirty_logp, dirty_old = logp.clone(), old.clone()
    dirty_logp[2, 3] = float("nan")
    dirty_old[4][bad[4]] = float("-inf")
    dirty_logp[~mask] = float("nan")  # garbage at padding must not matter either
    dirty_old[~mask] = float("inf")
    loss, grad, m = ours(loss_type, dirty_logp, dirty_old, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert m["nonfinite_tokens"] == 2 and m["num_tokens"] == mask.sum() - 2
    assert all(torch.isfinite(v) for v in m.values())
    # same as masking those tokens out, with the normalizer of the original mask
    n = aggregation_normalizer("seq-mean-token-mean", mask)
    loss2, grad2, _ = ours(loss_type, logp, old, adv, mask & ~bad, normalizer=n)
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch_gives_zero_loss(loss_type):
    logp, old, adv, mask = make_batch()
    loss, grad, m = ours(loss_type, logp, old, adv, torch.zeros_like(mask))
    assert loss.item() == 0 and (grad == 0).all()
    assert all(torch.isfinite(v) for v in m.values())
    loss, _, _ = ours(loss_type, logp, old, adv, torch.zeros_like(mask), normalizer=torch.tensor(0.0))
    assert loss.item() == 0


def test_bad_options_name_the_problem():
    logp, old, adv, mask = make_batch()
    with pytest.raises(UserInputError, match="'ppo'.*grpo, gspo, gmpo, kpo, kpo_clipped"):
        ours("ppo", logp, old, adv, mask)
    with pytest.raises(UserInputError, match="clip_lo'.*clip_low"):
        ours("grpo", logp, old, adv, mask, clip_lo=0.1)
    with pytest.raises(UserInputError, match="kalman_q.*does not apply.*grpo"):
        ours("grpo", logp, old, adv, mask, kalman_q=1e-4)
    with pytest.raises(UserInputError, match="dual_clip.*does not apply.*'kpo'"):
        ours("kpo", logp, old, adv, mask, dual_clip=3.0)
    with pytest.raises(UserInputError, match="agg='mean'"):
        ours("kpo", logp, old, adv, mask, agg="mean")
    with pytest.raises(UserInputError, match="kl_estimator"):
        ours("kpo", logp, old, adv, mask, kl_estimator="k4")
    with pytest.raises(UserInputError, match="beta > 0 needs ref_logp"):
        ours("kpo", logp, old, adv, mask, beta=0.1)
    with pytest.raises(UserInputError, match="kalman_v=0"):
        ours("kpo", logp, old, adv, mask, kalman_v=0)
    with pytest.raises(UserInputError, match="clip_low=-0.1"):
        ours("grpo", logp, old, adv, mask, clip_low=-0.1)
    with pytest.raises(UserInputError, match="dual_clip=0.5"):
        ours("grpo", logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(UserInputError, match="kalman_q='big'"):
        resolve_loss_options("kpo", kalman_q="big")
