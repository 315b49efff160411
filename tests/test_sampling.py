"""Sampling is exactly what the loss assumes: no model-shipped logits processors, one source of the sampling
parameters (sampler and log-probs), per-(seed, rank, step) seeds, the same prompt tokens everywhere (BOS), and
chat template variables (a thinking switch)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import GenerationConfig

from kpo_lightning import KPOModule, RolloutCallback
from kpo_lightning.algorithms.logprobs import token_logprobs
from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.cli.config_loading import load_config
from kpo_lightning.config import DataConfig, LossConfig, OptimConfig, RolloutConfig
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.data.prompt_tokens import encode_prompt
from kpo_lightning.errors import UserInputError
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import build_tiny_random_model
from kpo_lightning.rollout.callback import RolloutInputs
from kpo_lightning.rollout.engine import HFGenerateEngine, SamplingParams, make_rollout, sampling_seed

PROMPTS = ["1+2=", "12+34="]


def shipped_generation_config(tok) -> GenerationConfig:
    """What a checkpoint might ship: penalties, suppressed and banned tokens, min-p, typical-p, cutoffs, a minimum
    length, a sequence bias, a forced first token, a stop string, its own temperature/top-k/top-p."""
    digits = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    return GenerationConfig(
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        do_sample=True,
        temperature=0.2,
        top_k=2,
        top_p=0.3,
        min_p=0.2,
        typical_p=0.4,
        epsilon_cutoff=0.05,
        eta_cutoff=0.05,
        repetition_penalty=2.0,
        no_repeat_ngram_size=1,
        suppress_tokens=digits[:3],
        begin_suppress_tokens=[digits[3]],
        bad_words_ids=[[digits[4]], [digits[5]]],
        min_new_tokens=6,
        min_length=10,
        sequence_bias={(digits[6],): 5.0},
        forced_bos_token_id=digits[7],
        renormalize_logits=True,
        max_length=8,
        exponential_decay_length_penalty=(2, 1.5),
        stop_strings=["9"],
    )


def generate(model, tok, seed: int = 7, **params):
    kw = dict(num_samples=4, max_new_tokens=10, seed=seed)
    kw.update(params)
    return HFGenerateEngine().generate(model, tok, PROMPTS, SamplingParams(**kw))


# ------------------------------------------------------------------ model-shipped sampling defaults do not leak


@pytest.mark.parametrize(
    "params",
    [dict(), dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=0.0)],
    ids=["T1", "T0.7-topk-topp", "greedy"],
)
def test_shipped_generation_config_changes_nothing(char_tokenizer, params):
    plain = build_tiny_random_model(char_tokenizer, seed=0)
    shipped = build_tiny_random_model(char_tokenizer, seed=0)
    shipped.generation_config = shipped_generation_config(char_tokenizer)
    before = shipped.generation_config.to_dict()

    a, b = generate(plain, char_tokenizer, **params), generate(shipped, char_tokenizer, **params)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert shipped.generation_config.to_dict() == before  # the shipped config is put back

    # The test can fail: generating from `shipped` with only our own fields set lets its processors in.
    torch.manual_seed(7)
    leaked = shipped.generate(
        input_ids=a.input_ids[:1, : a.prompt_length],
        tokenizer=char_tokenizer,
        generation_config=GenerationConfig(do_sample=True, max_new_tokens=10),
    )
    torch.manual_seed(7)
    clean = plain.generate(
        input_ids=a.input_ids[:1, : a.prompt_length],
        generation_config=GenerationConfig(do_sample=True, max_new_tokens=10),
    )
    assert not torch.equal(leaked, clean)


def test_shipped_generation_config_under_lora(char_tokenizer):
    """peft copies its own view of the generation config onto the base model inside generate: still neutral."""
    from peft import LoraConfig, get_peft_model

    plain = build_tiny_random_model(char_tokenizer, seed=0)
    base = build_tiny_random_model(char_tokenizer, seed=0)
    base.generation_config = shipped_generation_config(char_tokenizer)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))  # B = 0: same
    assert torch.equal(generate(plain, char_tokenizer).input_ids, generate(lora, char_tokenizer).input_ids)
    assert base.generation_config.min_p == 0.2


# ------------------------------------------------------------------ one source of sampling parameters


def test_rollout_temperature_is_the_log_prob_temperature(char_tokenizer, tiny_model):
    """pi_old of a rollout sampled at T=0.5 by a user's settings is log-softmax(logits / 0.5), whatever the
    module's configured temperature (1.0)."""
    module = KPOModule(
        tiny_model,
        char_tokenizer,
        rollout=RolloutConfig(num_generations=2, temperature=1.0),
        reward_fn=lambda **kw: 0.0,
    )
    params = SamplingParams(num_samples=2, max_new_tokens=5, temperature=0.5, seed=0)
    rollout = make_rollout(module.engine, tiny_model, char_tokenizer, PROMPTS, ["3", "46"], params, module.reward_fn)
    assert rollout.params is params
    old, _, _ = module._old_logprobs(rollout, first_row=0)
    gen = rollout.generation
    with torch.no_grad():
        pos = (gen.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = tiny_model(input_ids=gen.input_ids, attention_mask=gen.attention_mask, position_ids=pos).logits
    logits = logits[:, gen.prompt_length - 1 : -1]
    at_half = token_logprobs(logits, gen.response_ids, temperature=0.5)
    at_one = token_logprobs(logits, gen.response_ids, temperature=1.0)
    m = gen.response_mask
    torch.testing.assert_close(old[m], at_half[m], rtol=1e-5, atol=1e-5)
    assert (old[m] - at_one[m]).abs().max() > 1e-2


def test_user_callback_temperature_and_group_reach_the_loss(char_tokenizer, tiny_model, monkeypatch):
    """A Trainer with RolloutCallback(params): every log-prob of the step (pi_old and pi_theta) is computed at
    the callback's temperature, and groups have the callback's size (2 here, against 4 configured)."""
    module = KPOModule(
        tiny_model,
        char_tokenizer,
        rollout=RolloutConfig(num_generations=4, temperature=1.0),
        optim=OptimConfig(lr=1e-3, num_minibatches=2, warmup_ratio=0.0),
        reward_fn=lambda completion, **kw: float(len(completion) % 2),
    )
    seen = []
    original = module.sequence_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("temperature"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "sequence_logprobs", spy)
    data = torch.utils.data.DataLoader([{"prompt": PROMPTS, "answer": ["3", "46"]}], batch_size=None)
    callback = RolloutCallback(SamplingParams(num_samples=2, max_new_tokens=5, temperature=0.5))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=data)
    assert module.rollout_step == 1
    assert len(seen) >= 2 and set(seen) == {0.5}


def test_greedy_training_rollout_is_refused(char_tokenizer, tiny_model):
    module = KPOModule(tiny_model, char_tokenizer, reward_fn=lambda **kw: 0.0)
    rollout = SimpleNamespace(params=SamplingParams(temperature=0.0))
    with pytest.raises(UserInputError, match="temperature"):
        module.sampling_params(rollout)


# ------------------------------------------------------------------ seeds per (seed, rank, step)


def test_sampling_seed_is_a_function_of_seed_rank_and_step():
    base = sampling_seed(0, 0, 0)
    assert sampling_seed(0, 0, 0) == base
    others = {sampling_seed(*t) for t in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1), (-1, 0, 0)]}
    assert base not in others and len(others) == 6
    assert all(0 <= s < 2**63 for s in others | {base})


def fake_inputs(model, tok, rank: int, step: int, seed: int = 3):
    """What RolloutCallback reads from a KPOModule (`RolloutInputs`), for rank `rank` at rollout step `step`."""
    return RolloutInputs(
        engine=HFGenerateEngine(),
        policy=model,
        tokenizer=tok,
        reward_fn=lambda **kw: 0.0,
        params=SamplingParams.for_training(RolloutConfig(num_generations=4, max_new_tokens=8)),
        advantage_estimator=LossConfig().advantage,
        seed=seed,
        global_rank=rank,
        rollout_step=step,
    )


def test_ranks_sample_different_rollouts_and_a_step_is_reproducible(char_tokenizer, tiny_model):
    callback = RolloutCallback()
    batch = {"prompt": PROMPTS, "answer": ["3", "46"]}

    def sample(rank, step, global_seed):
        torch.manual_seed(global_seed)  # whatever the global RNG holds, the step's draw is the same
        r = callback._make(fake_inputs(tiny_model, char_tokenizer, rank, step), batch)
        assert r.params.seed == sampling_seed(3, rank, step)
        return r.generation.input_ids

    rank0 = sample(0, 5, global_seed=1)
    assert torch.equal(rank0, sample(0, 5, global_seed=2))  # a resumed run at step 5 draws the same
    assert not torch.equal(rank0, sample(1, 5, global_seed=1))  # another process draws differently
    assert not torch.equal(rank0, sample(0, 6, global_seed=1))  # the next step draws differently

    state = torch.get_rng_state()
    callback._make(fake_inputs(tiny_model, char_tokenizer, 0, 0), batch)
    assert torch.equal(state, torch.get_rng_state())  # seeded sampling leaves the global RNG alone


def test_the_callback_reads_the_module_only_through_rollout_inputs(char_tokenizer, tiny_model):
    """RolloutCallback's whole view of the module is `rollout_inputs()`: an object with only that method works,
    and KPOModule's answer is its own engine, policy, reward, training settings, estimator, seed, rank and step."""
    inputs = fake_inputs(tiny_model, char_tokenizer, 1, 5)
    batch = {"prompt": PROMPTS, "answer": ["3", "46"]}
    RolloutCallback().on_train_batch_start(None, SimpleNamespace(rollout_inputs=lambda: inputs), batch, 0)
    assert batch["rollout"].params.seed == sampling_seed(3, 1, 5)
    assert batch["rollout"].generation.input_ids.shape[0] == 2 * 4

    cfg = RolloutConfig(num_generations=3, temperature=0.7)
    module = KPOModule(tiny_model, char_tokenizer, loss=LossConfig(advantage="rloo"), rollout=cfg, seed=9)
    module.rollout_step = 4
    got = module.rollout_inputs()
    assert (got.engine, got.policy, got.tokenizer, got.reward_fn) == (
        module.engine,
        tiny_model,
        char_tokenizer,
        module.reward_fn,
    )
    assert got.params == SamplingParams.for_training(cfg)
    assert (got.advantage_estimator, got.seed, got.global_rank, got.rollout_step) == ("rloo", 9, 0, 4)


# ------------------------------------------------------------------ special tokens (BOS) for plain prompts


@pytest.fixture
def bos_tokenizer():
    """The character tokenizer, but adding <s> in front of every encoded text (a Llama/Mistral-style BOS)."""
    tok = build_char_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("1+2=")["input_ids"][0] == tok.bos_token_id
    return tok


def test_plain_prompts_get_the_tokenizers_bos_once(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert encode_prompt(bos_tokenizer, "1+2=") == [bos] + bos_tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    assert encode_prompt(bos_tokenizer, "<s>1+2=") == encode_prompt(bos_tokenizer, "1+2=")  # chat template wrote it
    plain = build_char_tokenizer()  # adds nothing: nothing is added
    assert encode_prompt(plain, "1+2=") == plain("1+2=", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template-with-bos"])
def test_sampler_and_length_check_count_the_same_tokens(bos_tokenizer, chat):
    """The sampler's prompt (what the loss also sees) starts with exactly one BOS, and the data module's
    length check counts exactly those tokens."""
    tok = bos_tokenizer
    if chat:
        tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    dm = PromptDataModule(DataConfig(chat_template=chat, prompts_per_step=2, val_size=0), tokenizer=tok)
    prompts = [dm.format_prompt(p) for p in PROMPTS]
    model = build_tiny_random_model(tok, seed=0)
    gen = HFGenerateEngine().generate(model, tok, prompts, SamplingParams(num_samples=1, max_new_tokens=2, seed=0))
    for row, prompt in enumerate(prompts):
        ids = gen.input_ids[row, : gen.prompt_length][gen.attention_mask[row, : gen.prompt_length].bool()]
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
        assert tok.decode(ids, skip_special_tokens=True) == PROMPTS[row]
        assert dm.num_prompt_tokens(prompt) == len(ids) == len(PROMPTS[row]) + 1


def test_length_check_counts_the_bos(bos_tokenizer):
    """A 4-character prompt is 5 tokens with its BOS: skipped at max_prompt_tokens=4, kept at 5."""
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "12+34=", "answer": "46"}]
    for limit, kept in ((4, 0), (5, 1), (7, 2)):
        cfg = DataConfig(source="arithmetic", max_prompt_tokens=limit, val_size=0)
        dm = PromptDataModule(cfg, tokenizer=bos_tokenizer)
        assert [dm._too_long(r["prompt"]) for r in rows].count(False) == kept


# ------------------------------------------------------------------ chat template variables

# A template with a thinking switch, as Qwen3's: thinking on unless enable_thinking is false, in which case the
# generation prompt holds an empty think block.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def thinking_module(**kwargs) -> PromptDataModule:
    tok = build_char_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    return PromptDataModule(DataConfig(chat_template=True, val_size=0, **kwargs), tokenizer=tok)


def test_chat_template_kwargs_reach_the_template():
    off = thinking_module(chat_template_kwargs={"enable_thinking": False}).format_prompt("1+2=")
    on = thinking_module(chat_template_kwargs={"enable_thinking": True}).format_prompt("1+2=")
    default = thinking_module().format_prompt("1+2=")
    assert off == "<|user|>1+2=\n<|assistant|><think>\n\n</think>\n\n"
    assert on == default == "<|user|>1+2=\n<|assistant|>"
    # the length check counts the templated prompt, think block included
    dm = thinking_module(chat_template_kwargs={"enable_thinking": False})
    assert dm.num_prompt_tokens(dm.format_prompt("1+2=")) == len(off)


def test_chat_template_kwargs_config():
    assert load_config(["preset=paper"]).data.chat_template_kwargs == {"enable_thinking": False}
    assert load_config([]).data.chat_template_kwargs == {}
    cfg = load_config(["preset=paper", "data.chat_template_kwargs.enable_thinking=true"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": True}
    bad = load_config(["data.chat_template_kwargs.add_generation_prompt=false"])
    with pytest.raises(UserInputError, match="data.chat_template_kwargs.add_generation_prompt"):
        check_config(bad)
    with pytest.raises(UserInputError, match="data.chat_template_kwargs.tokenize"):
        thinking_module(chat_template_kwargs={"tokenize": True}).setup()


def test_chat_template_kwargs_error_is_one_line(capsys):
    from kpo_lightning.cli.main import main

    code = main(["data.chat_template_kwargs.tokenize=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.chat_template_kwargs.tokenize" in err
