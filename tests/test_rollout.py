"""Rollout masks: the prompt is excluded, eos is kept, everything after eos (padding) is excluded."""

import torch

from kpo_lightning.rollout.engine import HFGenerateEngine, SamplingParams, make_rollout, response_mask_from_ids


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    eos, pad = 2, 2  # pad == eos, as in SmolLM2: padding is recognised by position, not by id
    ids = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    mask, truncated = response_mask_from_ids(ids, [eos])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert truncated.tolist() == [False, False, True, False]


def test_response_mask_with_several_eos_ids():
    ids = torch.tensor([[5, 9, 3, 3], [5, 3, 9, 9]])
    mask, truncated = response_mask_from_ids(ids, [3, 9])
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert not truncated.any()


def test_engine_layout_and_masks(char_tokenizer, tiny_model):
    torch.manual_seed(0)
    prompts = ["1+2=", "12+34="]
    gen = HFGenerateEngine().generate(
        tiny_model, char_tokenizer, prompts, SamplingParams(num_samples=3, max_new_tokens=6)
    )
    assert gen.input_ids.shape[0] == 6
    P = gen.prompt_length
    eos = char_tokenizer.eos_token_id
    pad = char_tokenizer.pad_token_id
    for row in range(6):
        prompt = prompts[row // 3]
        prompt_ids = gen.input_ids[row, :P][gen.attention_mask[row, :P].bool()]
        assert char_tokenizer.decode(prompt_ids) == prompt  # left-padded prompt, group-contiguous
        resp = gen.response_ids[row]
        m = gen.response_mask[row]
        assert m[0]  # at least one token
        valid = resp[m].tolist()
        if eos in valid:
            assert valid.index(eos) == len(valid) - 1  # eos kept, and it is the last valid token
        else:
            assert gen.truncated[row] and len(valid) == resp.numel()
        assert (resp[~m] == pad).all()
        assert torch.equal(gen.attention_mask[row, P:].bool(), m)


def test_generation_runs_in_eval_mode_and_restores_train_mode(char_tokenizer, tiny_model):
    """Sampling in eval mode (no dropout noise in the behaviour policy), then back to train mode for the update."""
    modes = []
    tiny_model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    tiny_model.train()
    HFGenerateEngine().generate(tiny_model, char_tokenizer, ["1+2="], SamplingParams(num_samples=2, max_new_tokens=4))
    assert modes and not any(modes)  # every forward of generate() saw eval mode
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    tiny_model.eval()  # and a model that was in eval mode stays in it
    HFGenerateEngine().generate(tiny_model, char_tokenizer, ["1+2="], SamplingParams(num_samples=2, max_new_tokens=4))
    assert not any(m.training for m in tiny_model.modules())


def test_make_rollout_scores_and_normalises(char_tokenizer, tiny_model):
    calls = []

    def reward(prompt, completion, answer, **kw):
        calls.append((prompt, answer))
        # group 1+1= always scores 1 (zero variance); group 2+2= scores 1, 0, 1, 0 in sampling order
        return 1.0 if prompt == "1+1=" else float(len(calls) % 2)

    r = make_rollout(
        HFGenerateEngine(),
        tiny_model,
        char_tokenizer,
        ["1+1=", "2+2="],
        ["2", "4"],
        SamplingParams(num_samples=4, max_new_tokens=5),
        reward,
    )
    assert r.rewards.shape == (8,) and r.advantages.shape == (8,)
    assert calls[:4] == [("1+1=", "2")] * 4 and calls[4:] == [("2+2=", "4")] * 4
    assert r.rewards.tolist() == [1, 1, 1, 1, 1, 0, 1, 0]
    assert r.advantages[:4].tolist() == [0, 0, 0, 0]  # a zero-variance group carries no signal
    for g in range(2):
        adv = r.advantages[g * 4 : (g + 1) * 4]
        assert abs(adv.sum().item()) < 1e-4  # centred within each group
    assert (r.advantages[4:].sign() == torch.tensor([1.0, -1, 1, -1])).all()
    assert r.stats["zero_var_group_frac"] == 0.5  # one of the two groups
    assert r.stats["reward"] == 0.75
