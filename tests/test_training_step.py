"""One training step of KPOModule on a fixed, injected rollout, checked in absolute terms.

What is checked here is not "two code paths agree" but what the step must do: which rows each forward holds
(mini-batches are contiguous blocks of whole groups; micro-batches honour `micro_batch_size` and
`max_tokens_per_micro_batch`), that the on-policy mini-batch has ratios exactly 1, that the off-policy one compares
against the policy before any update, and that the logged loss is the hand-computed one. Each run is one Lightning
`fit` of a 16-row rollout on the tiny model: about a second.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import kpo_lightning.training.module as module_mod
from kpo_lightning import KPOModule
from kpo_lightning.config import LossConfig, OptimConfig, RolloutConfig
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from ddp_gradient import GROUPS, FixedRollout, G, global_rollout, one_step_trainer  # noqa: E402

N = GROUPS * G  # 16 rows: 4 groups of 4, prompt 5 tokens, response up to 7 (ragged, each row >= 1 token)


def run_step(loss_type="kpo_clipped", lr=0.0, beta=0.0, **optim):
    """Fit one rollout step; returns (forwards, loss_calls, module, rollout, initial model copy).

    forwards: one (rows, grad_enabled) per policy forward, rows identified by matching input_ids to the rollout.
    loss_calls: (logp, old_logp, advantages, mask) of every compute_policy_loss call the module makes, in order.
    """
    tok = build_char_tokenizer()
    model = build_tiny_random_model(tok, seed=0)
    initial = copy.deepcopy(model)
    rollout = global_rollout(len(tok))
    ids = rollout.generation.input_ids
    assert len({tuple(r) for r in ids.tolist()}) == N  # rows are distinguishable by their ids

    forwards = []

    def hook(mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        rows = [int((ids == r).all(dim=1).nonzero()[0]) for r in x]
        forwards.append((rows, torch.is_grad_enabled()))

    model.register_forward_pre_hook(hook, with_kwargs=True)  # also on the reference: KPOModule deep-copies it
    calls = []
    real = module_mod.compute_policy_loss

    def recording(loss_type, logp, old_logp, advantages, mask, **kw):
        calls.append((logp.detach().clone(), old_logp.detach().clone(), advantages.clone(), mask.clone()))
        return real(loss_type, logp, old_logp, advantages, mask, **kw)

    optim = {"lr": lr, "num_minibatches": 2, "grad_clip": 0.0, "warmup_ratio": 0.0, **optim}
    module = KPOModule(
        model,
        tok,
        loss=LossConfig(type=loss_type, beta=beta),
        optim=OptimConfig(**optim),
        rollout=RolloutConfig(num_generations=G),
        reward_fn=lambda **kw: 0.0,
    )
    data = torch.utils.data.DataLoader([{"prompt": ["x"], "answer": ["y"]}], batch_size=None)
    trainer = one_step_trainer([FixedRollout(rollout)])
    module_mod.compute_policy_loss = recording
    try:
        trainer.fit(module, train_dataloaders=data)
    finally:
        module_mod.compute_policy_loss = real
    return forwards, calls, module, rollout, initial


def blocks(rows, size):
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# Rows 0-7 (groups 0, 1) are mini-batch 0 (on-policy), rows 8-15 (groups 2, 3) mini-batch 1. Sequences are
# P + R = 12 tokens wide, so a 30-token cap holds 2 rows and a 40-token cap 3.
@pytest.mark.parametrize(
    "optim, rows_per_forward",
    [
        ({}, 8),
        ({"micro_batch_size": 3}, 3),
        ({"max_tokens_per_micro_batch": 30}, 2),
        ({"micro_batch_size": 2, "max_tokens_per_micro_batch": 40}, 2),  # the smaller of the two wins
        ({"micro_batch_size": 4, "max_tokens_per_micro_batch": 40}, 3),
    ],
)
def test_minibatch_and_micro_batch_row_sets(optim, rows_per_forward):
    forwards, calls, *_ = run_step(**optim)
    mb0, mb1 = list(range(0, 8)), list(range(8, 16))
    expected = (
        [(b, False) for b in blocks(mb1, rows_per_forward)]  # pi_old of the off-policy mini-batch, no grad
        + [(b, True) for b in blocks(mb0, rows_per_forward)]  # mini-batch 0 trains and supplies its own pi_old
        + [(b, True) for b in blocks(mb1, rows_per_forward)]
    )
    assert forwards == expected
    assert len(calls) == sum(g for _, g in expected)


def test_reference_forwards_are_micro_batched_too():
    """With a KL term the reference model scores every row, in micro-batches of the same size, without grad."""
    forwards, calls, *_ = run_step(beta=0.1, micro_batch_size=3)
    mb0, mb1 = list(range(0, 8)), list(range(8, 16))
    assert forwards == (
        [(b, False) for b in blocks(mb1, 3)]  # pi_old of mini-batch 1
        + [(b, False) for b in blocks(mb0 + mb1, 3)]  # reference log-probs of all rows
        + [(b, True) for b in blocks(mb0, 3) + blocks(mb1, 3)]
    )


@pytest.mark.parametrize("loss_type", ["kpo_clipped", "grpo", "gspo"])
def test_ratios_are_one_on_policy_and_pi_old_is_the_policy_before_the_update(loss_type):
    forwards, calls, module, rollout, initial = run_step(loss_type, lr=1e-2, micro_batch_size=4)
    assert len(calls) == 4  # 2 mini-batches x 2 micro-batches
    gen = rollout.generation
    with torch.no_grad():
        before, _ = module.sequence_logprobs(initial, gen.input_ids, gen.attention_mask, gen.prompt_length)
    for k, (logp, old, adv, mask) in enumerate(calls):
        rows = slice(4 * k, 4 * k + 4)
        assert torch.equal(mask, gen.response_mask[rows])
        torch.testing.assert_close(adv, rollout.advantages[rows], rtol=0, atol=0)
        # pi_old of every row is the policy before any optimizer step (the same forward on the same weights:
        # measured max |diff| 0 here although the batch shapes differ; 1e-6 is ~1 float32 ulp at |logp| ~ 5,
        # for other BLAS)
        torch.testing.assert_close(old[mask], before[rows][mask], rtol=0, atol=1e-6)
        if k < 2:  # on-policy mini-batch: pi_old is this very forward, so every ratio is exactly 1
            assert torch.equal(old[mask], logp[mask])
        else:  # off-policy: one optimizer step at lr 1e-2 moved the policy, the ratios are no longer 1
            assert (logp[mask] - old[mask]).abs().max() > 1e-3
    logs = module.last_logs
    assert logs["train/num_tokens"] == float(gen.response_mask.sum())


@pytest.mark.parametrize("loss_type", ["kpo_clipped", "kpo", "grpo", "gspo", "gmpo"])
def test_loss_and_ratio_metrics_at_lr_zero_are_the_hand_computed_ones(loss_type):
    """At lr 0 the policy never moves, every ratio is exactly 1 and every loss is the plain policy gradient
    surrogate: mini-batch loss = -sum_i A_i / (rows in the mini-batch) under seq-mean-token-mean."""
    _, calls, module, rollout, _ = run_step(loss_type, lr=0.0, micro_batch_size=3)
    adv = rollout.advantages.double()
    expected = [-adv[0:8].sum().item() / 8, -adv[8:16].sum().item() / 8]
    logs = module.last_logs
    # float32 sums of 16 numbers of size ~1: measured error 3.2e-8, 3x margin
    assert logs["train/loss"] == pytest.approx(sum(expected) / 2, abs=1e-7)
    assert logs["train/ratio_mean_raw"] == 1.0 and logs["train/ratio_var_raw"] == 0.0
    for logp, old, _, mask in calls:
        assert torch.equal(old[mask], logp[mask])
    assert logs["train/clip_frac_low"] == 0.0 and logs["train/clip_frac_high"] == 0.0


def test_groups_never_split_across_mini_batches():
    """num_minibatches must divide the number of groups: 4 groups into 3 mini-batches is refused."""
    from kpo_lightning.errors import UserInputError

    with pytest.raises(UserInputError, match="num_minibatches=3"):
        run_step(num_minibatches=3)


def test_second_epoch_reuses_pi_old_from_before_any_update():
    """epochs_per_rollout=2: four optimizer steps; pi_old of every row stays the policy that sampled the rollout,
    so only the very first mini-batch is on-policy."""
    forwards, calls, module, rollout, initial = run_step("kpo_clipped", lr=1e-2, epochs_per_rollout=2)
    mb0, mb1 = list(range(0, 8)), list(range(8, 16))
    assert forwards == [(mb1, False), (mb0, True), (mb1, True), (mb0, True), (mb1, True)]
    gen = rollout.generation
    with torch.no_grad():
        before, _ = module.sequence_logprobs(initial, gen.input_ids, gen.attention_mask, gen.prompt_length)
    for k, (logp, old, _, mask) in enumerate(calls):
        rows = mb0 if k % 2 == 0 else mb1
        torch.testing.assert_close(old[mask], before[rows][mask], rtol=0, atol=1e-6)  # as above: measured 0
        if k == 0:
            assert torch.equal(old[mask], logp[mask])
        else:
            assert (logp[mask] - old[mask]).abs().max() > 1e-3
