"""The filter set by response length (issue 19): tau = L * sqrt(Q/V), `loss.kalman_tau` / `loss.kalman_ref_length`,
the length-aware default for the KPO losses, the start-up warning at tau < 1, and the two logged names
`train/kalman_tau` and `train/filter_weight`."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from kpo_lightning import KPOModule
from kpo_lightning.algorithms.kalman import (
    constant_drift_weights,
    kalman_filter_reference,
    mean_filter_weight,
    qv_from_tau,
    tau_at,
)
from kpo_lightning.algorithms.losses import (
    DEFAULT_KALMAN_TAU,
    KPO_LOSSES,
    LOSS_DEFAULTS,
    LOSS_TYPES,
    compute_policy_loss,
    kalman_options,
    short_filter_warning,
)
from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.cli.config_loading import load_config
from kpo_lightning.config import Config, LossConfig, OptimConfig, RolloutConfig
from kpo_lightning.errors import UserInputError
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model
from kpo_lightning.training.module import _loss_options

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from ddp_gradient import FixedRollout, G, global_rollout, one_step_trainer  # noqa: E402


def config_error(max_new_tokens: int = 16, **loss) -> str | None:
    """check_config's message for a default config with these loss.* values, or None when it passes."""
    cfg = Config()
    cfg.loss = dataclasses.replace(cfg.loss, **loss)
    cfg.rollout = dataclasses.replace(cfg.rollout, max_new_tokens=max_new_tokens)
    try:
        check_config(cfg)
    except UserInputError as e:
        return str(e)
    return None


def module_error(tiny_model, tokenizer, **loss) -> str | None:
    try:
        KPOModule(tiny_model, tokenizer, loss=LossConfig(**loss))
    except UserInputError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------ the formula


def test_tau_and_qv_convert_both_ways():
    assert qv_from_tau(4.1, 100) == pytest.approx(1.681e-3, rel=1e-12)
    assert qv_from_tau(4.096, 4096) == 1e-6  # the paper's Q/V, exactly (also in float arithmetic)
    assert tau_at(4096, 1e-6, 1.0) == pytest.approx(4.096, rel=1e-12)
    assert tau_at(100, 2e-3, 2.0) == pytest.approx(100 * math.sqrt(1e-3), rel=1e-12)  # only Q/V matters


@pytest.mark.parametrize("q, p0", [(1e-6, 0.0), (1e-3, 0.0), (0.05, 0.0), (1e-4, 0.3)])
def test_constant_drift_weights_are_the_filter_run_on_a_constant_input(q, p0):
    """w_k is what the filter's own recursion makes of a constant log-ratio 1 (x0 = 0) at valid rank k."""
    n = 300
    weights = constant_drift_weights(q, 1.0, n, p0)
    expected = kalman_filter_reference(torch.ones(1, n, dtype=torch.float64), torch.ones(1, n), q, 1.0, p0)[0]
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-15)


def test_constant_drift_weights_follow_one_minus_sech():
    """With P0 = 0 the share of a constant drift carried at token t is ~ 1 - sech(t * sqrt(Q/V)) (the issue's table:
    0.967 at the end of 4096 tokens at the paper's Q/V, 0.62 averaged over them). The continuum form is closer the
    smaller sqrt(Q/V) (the step per token): measured max |difference| 2.5e-4 at Q/V 1e-6, 0.010 at 1.681e-3."""
    for qv, n, atol in ((1e-6, 4096, 4e-4), (1.681e-3, 100, 0.015)):
        w = constant_drift_weights(qv, 1.0, n)
        t = torch.arange(1, n + 1, dtype=torch.float64)
        torch.testing.assert_close(w, 1 - 1 / torch.cosh(t * math.sqrt(qv)), rtol=0.0, atol=atol)
    w = constant_drift_weights(1e-6, 1.0, 4096)
    assert w[-1].item() == pytest.approx(0.967, abs=5e-4) and w.mean().item() == pytest.approx(0.62, abs=5e-3)
    assert constant_drift_weights(1e-6, 1.0, 41)[-1].item() == pytest.approx(8.6e-4, rel=0.01)


def test_mean_filter_weight_counts_each_valid_token_at_its_rank():
    """Averaged over valid tokens, each at its rank among its row's valid tokens (holes skipped, as the filter)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 40, generator=g) > 0.4
    mask[2] = False  # a row without valid tokens counts for nothing
    q = 4e-3
    filtered_ones = kalman_filter_reference(torch.ones(6, 40, dtype=torch.float64), mask, q, 1.0)
    expected = filtered_ones[mask].mean()
    assert mean_filter_weight(mask, q, 1.0).item() == pytest.approx(expected.item(), rel=1e-12)
    assert mean_filter_weight(torch.zeros(2, 5, dtype=torch.bool), q, 1.0).item() == 0.0


# ------------------------------------------------------------------------------------------ the options


def test_kalman_tau_sets_q_from_the_length():
    opts = kalman_options(LossConfig(kalman_tau=4.1), max_new_tokens=100)
    assert opts == {"kalman_q": pytest.approx(1.681e-3, rel=1e-12), "kalman_v": 1.0, "kalman_p0": 0.0}
    opts = kalman_options(LossConfig(kalman_tau=2.0, kalman_ref_length=1000, kalman_v=3.0), max_new_tokens=100)
    assert opts["kalman_q"] == pytest.approx(3.0 * 4e-6, rel=1e-12)  # L = kalman_ref_length; Q = V * (tau / L)^2
    assert kalman_options(LossConfig(kalman_q=2e-5), 100)["kalman_q"] == 2e-5


@pytest.mark.parametrize("loss_type", KPO_LOSSES)
def test_kpo_losses_default_to_tau_at_max_new_tokens_and_other_losses_keep_the_paper_diagnostic(loss_type):
    for length in (12, 160, 4096):
        opts = kalman_options(LossConfig(type=loss_type), max_new_tokens=length)
        assert tau_at(length, opts["kalman_q"], opts["kalman_v"]) == pytest.approx(DEFAULT_KALMAN_TAU, rel=1e-12)
    # kalman_ref_length alone moves the default tau's L
    opts = kalman_options(LossConfig(type=loss_type, kalman_ref_length=400), max_new_tokens=12)
    assert opts["kalman_q"] == pytest.approx(qv_from_tau(DEFAULT_KALMAN_TAU, 400), rel=1e-12)
    for other in set(LOSS_TYPES) - set(KPO_LOSSES):
        assert kalman_options(LossConfig(type=other), 12)["kalman_q"] == LOSS_DEFAULTS["kpo_clipped"]["kalman_q"]
        assert kalman_options(LossConfig(type=other, kalman_tau=1.0), 10)["kalman_q"] == pytest.approx(1e-2)


def test_module_and_compute_policy_loss_defaults():
    """KPOModule (and so run.py) gives a KPO loss the length-aware default; compute_policy_loss alone keeps the
    paper's kalman_q (it does not know the response length)."""
    opts = _loss_options(LossConfig(type="kpo_clipped"), max_new_tokens=12)
    assert opts["kalman_q"] == pytest.approx((DEFAULT_KALMAN_TAU / 12) ** 2, rel=1e-12)
    assert "kalman_q" not in _loss_options(LossConfig(type="grpo"), max_new_tokens=12)
    assert LOSS_DEFAULTS["kpo_clipped"]["kalman_q"] == 1e-6 and LOSS_DEFAULTS["kpo"]["kalman_q"] == 1e-4


def test_both_q_and_tau_is_one_line_from_config_and_api_alike(tiny_model, char_tokenizer):
    expected = (
        "loss.kalman_q=1e-06 and loss.kalman_tau=4.0 are both set: set one of them (kalman_tau sets Q/V = "
        "(kalman_tau / L)^2, L = loss.kalman_ref_length or rollout.max_new_tokens); clear the other with "
        "loss.kalman_q=null or loss.kalman_tau=null"
    )
    assert config_error(kalman_q=1e-6, kalman_tau=4.0) == expected
    assert module_error(tiny_model, char_tokenizer, kalman_q=1e-6, kalman_tau=4.0) == expected
    assert config_error(type="grpo", kalman_q=1e-6, kalman_tau=4.0) == expected  # the diagnostic filter too
    ref_only = config_error(kalman_q=1e-6, kalman_ref_length=100)
    assert ref_only and ref_only.startswith("loss.kalman_ref_length=100 only scales loss.kalman_tau")
    assert module_error(tiny_model, char_tokenizer, kalman_q=1e-6, kalman_ref_length=100) == ref_only


@pytest.mark.parametrize(
    "loss, needle",
    [
        ({"kalman_tau": 0.0}, "loss.kalman_tau=0.0 is invalid: it must be > 0"),
        ({"kalman_tau": -1.0}, "loss.kalman_tau=-1.0 is invalid: it must be > 0"),
        ({"kalman_tau": float("inf")}, "loss.kalman_tau=inf is invalid: it must be a finite number"),
        ({"kalman_tau": 4.0, "kalman_ref_length": 0}, "loss.kalman_ref_length=0 is invalid: it must be >= 1"),
    ],
)
def test_bad_tau_values_are_one_line_from_config_and_api_alike(tiny_model, char_tokenizer, loss, needle):
    from_config = config_error(**loss)
    assert from_config is not None and from_config.startswith(needle), from_config
    assert module_error(tiny_model, char_tokenizer, **loss) == from_config


def test_run_py_refuses_both_keys_with_exit_2(capsys):
    from kpo_lightning.cli.main import main

    code = main(["loss.kalman_q=1e-6", "loss.kalman_tau=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: loss.kalman_q=1e-06 and loss.kalman_tau=4.0 are both set")


def test_paper_preset_keeps_its_q_and_tau_4096_at_4096_gives_identical_losses():
    paper = load_config(["preset=paper"])
    assert paper.loss.kalman_q == 1e-6 and paper.loss.kalman_tau is None and paper.rollout.max_new_tokens == 4096
    as_q = _loss_options(paper.loss, paper.rollout.max_new_tokens)
    assert as_q["kalman_q"] == 1e-6
    variants = [
        ["loss.kalman_q=null", "loss.kalman_tau=4.096", "loss.kalman_ref_length=4096"],
        ["loss.kalman_q=null", "loss.kalman_tau=4.096"],  # L = rollout.max_new_tokens = 4096
    ]
    g = torch.Generator().manual_seed(0)
    B, T = 8, 4096
    old = -torch.rand(B, T, generator=g) * 3
    logp0 = old + torch.randn(B, T, generator=g) * 0.05  # off-policy drift: the clip binds on some tokens
    adv = torch.randn(B, generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(100, T + 1, (B, 1), generator=g)

    def loss_and_grad(opts):
        logp = logp0.clone().requires_grad_(True)
        loss, metrics = compute_policy_loss("kpo_clipped", logp, old, adv, mask, **opts)
        loss.backward()
        return loss.detach(), logp.grad, metrics

    ref_loss, ref_grad, ref_metrics = loss_and_grad(as_q)
    assert ref_metrics["clip_frac_low"] + ref_metrics["clip_frac_high"] > 0
    for extra in variants:
        cfg = load_config(["preset=paper", *extra])
        check_config(cfg)
        opts = _loss_options(cfg.loss, cfg.rollout.max_new_tokens)
        assert opts == as_q
        loss, grad, metrics = loss_and_grad(opts)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        assert all(torch.equal(metrics[k], ref_metrics[k]) for k in ref_metrics)


# ------------------------------------------------------------------------------------------ the warning


def test_warning_for_the_old_default_constants_and_not_at_tau_one_or_more():
    paper_q = {"kalman_q": 1e-6, "kalman_v": 1.0, "kalman_p0": 0.0}
    for length in (12, 160):  # the default job's and the chain preset's max_new_tokens
        line = short_filter_warning("kpo_clipped", paper_q, length)
        assert line is not None and "\n" not in line
        assert f"tau = max_new_tokens * sqrt(Q/V) = {length * 1e-3:.3g} < 1" in line
        assert "the filtered ratio stays ~1, KPO acts as REINFORCE on stale samples; set loss.kalman_tau" in line
        assert short_filter_warning("kpo", paper_q, length) is not None
        assert short_filter_warning("grpo", paper_q, length) is None  # only KPO losses
    for tau in (1.0, 4.0, 40.0):
        assert short_filter_warning("kpo_clipped", kalman_options(LossConfig(kalman_tau=tau), 12), 12) is None
    assert short_filter_warning("kpo_clipped", kalman_options(LossConfig(kalman_tau=0.99), 12), 12) is not None
    assert short_filter_warning("kpo_clipped", kalman_options(LossConfig(), 12), 12) is None  # the new default


# ------------------------------------------------------------------------------------------ a training step


def fit_one_step(loss: LossConfig, max_new_tokens: int = 7) -> KPOModule:
    """One rollout step of KPOModule on the fixed 16-row rollout of tests/scripts/ddp_gradient.py."""
    tok = build_char_tokenizer()
    module = KPOModule(
        build_tiny_random_model(tok, seed=0),
        tok,
        loss=loss,
        optim=OptimConfig(lr=1e-3, num_minibatches=2, warmup_ratio=0.0),
        rollout=RolloutConfig(num_generations=G, max_new_tokens=max_new_tokens),
        reward_fn=lambda **kw: 0.0,
    )
    trainer = one_step_trainer([FixedRollout(global_rollout(len(tok)))])
    data = torch.utils.data.DataLoader([{"prompt": ["x"], "answer": ["y"]}], batch_size=None)
    trainer.fit(module, train_dataloaders=data)
    return module


def test_kalman_tau_4_1_at_100_tokens_trains_with_qv_1_681e_3_and_logs_it(capsys):
    module = fit_one_step(LossConfig(kalman_tau=4.1), max_new_tokens=100)
    out = capsys.readouterr().out
    assert module.loss_options["kalman_q"] == pytest.approx(1.681e-3, rel=1e-12)
    assert "[kpo] kpo_clipped filter: Q/V = 0.001681 (tau 4.1 at L = 100); tau at max_new_tokens 100: 4.1" in out
    assert "warning" not in out
    mask = global_rollout(len(build_char_tokenizer())).generation.response_mask  # the rollout the step trained on
    logs = module.last_logs
    assert logs["train/kalman_tau"] == pytest.approx(mask.sum(1).double().mean().item() * 0.041, rel=1e-6)
    expected_weight = kalman_filter_reference(torch.ones(mask.shape, dtype=torch.float64), mask, 1.681e-3, 1.0)
    assert logs["train/filter_weight"] == pytest.approx(expected_weight[mask].mean().item(), rel=1e-9)


def test_old_constants_warn_once_at_start_and_grpo_logs_no_filter_names(capsys):
    module = fit_one_step(LossConfig(kalman_q=1e-6), max_new_tokens=12)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("[kpo] warning")]
    assert len(warnings) == 1 and "tau = max_new_tokens * sqrt(Q/V) = 0.012 < 1" in warnings[0], out
    assert module.last_logs["train/filter_weight"] < 1e-3  # the filtered ratio carries almost nothing
    grpo = fit_one_step(LossConfig(type="grpo"), max_new_tokens=12)
    assert "warning" not in capsys.readouterr().out
    assert "train/kalman_tau" not in grpo.last_logs and "train/filter_weight" not in grpo.last_logs
