"""The built-in task, the character tokenizer, the tiny random model and the shipped tiny-arith asset."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kpo_lightning.data.arithmetic import (
    ARITHMETIC_VAL_SEED_OFFSET,
    arithmetic_problem,
    exact_match_reward,
    extract_boxed,
    format_completion,
    is_val_pair,
    validation_problem,
)
from kpo_lightning.models.tiny_models import build_tiny_random_model

ASSET = Path(__file__).resolve().parents[1] / "kpo_lightning" / "assets" / "tiny-arith"


def _operands(prompt: str) -> tuple[int, str, int]:
    op = "+" if "+" in prompt else "-"
    a, b = prompt.rstrip("=").split(op)
    return int(a), op, int(b)


def test_problems_are_deterministic_and_correct():
    first = [arithmetic_problem(7, i) for i in range(200)]
    assert first == [arithmetic_problem(7, i) for i in range(200)]
    assert first != [arithmetic_problem(8, i) for i in range(200)]
    for p in first + [arithmetic_problem(3, i, ops="+-") for i in range(200)]:
        a, op, b = _operands(p["prompt"])
        assert 0 <= a <= 99 and 0 <= b <= 99
        assert p["prompt"] == f"{a}{op}{b}="
        assert int(p["answer"]) == (a + b if op == "+" else a - b) >= 0
    small = [arithmetic_problem(0, i, max_operand=5) for i in range(100)]
    assert all(max(_operands(p["prompt"])[::2]) <= 5 for p in small)


def test_val_and_train_streams_are_disjoint():
    train = {arithmetic_problem(0, i)["prompt"] for i in range(3000)}
    val = [validation_problem(0, i) for i in range(300)]
    assert val == [arithmetic_problem(ARITHMETIC_VAL_SEED_OFFSET, i, split="val") for i in range(300)]
    assert not train & {p["prompt"] for p in val}  # held-out operand pairs never appear in training
    assert all(is_val_pair(*_operands(p["prompt"])[::2]) for p in val)
    assert len({p["prompt"] for p in val}) > 250  # and the val stream is varied
    with pytest.raises(ValueError):
        arithmetic_problem(0, 0, split="test")


def test_boxed_reward():
    assert extract_boxed("so \\boxed{1} no, \\boxed{ 46 }") == "46"
    assert extract_boxed("46") is None
    assert exact_match_reward(format_completion("46"), "46") == 1.0
    assert exact_match_reward("\\boxed{45}", "46") == 0.0
    assert exact_match_reward("\\boxed{x}", "46") == 0.0


def test_tokenizer_round_trip_and_save_load(char_tokenizer, tmp_path):
    tok = char_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    strings = [
        arithmetic_problem(0, i)["prompt"] + format_completion(arithmetic_problem(0, i)["answer"]) for i in range(50)
    ] + ["What is 12 - 3?  ok", "\\boxed{-7}", "a*b=c"]
    for s in strings:
        ids = tok.encode(s)
        assert len(ids) == len(s)  # one token per character, nothing added
        assert tok.decode(ids, skip_special_tokens=True) == s
    batch = tok(["1+2=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left" and loaded.eos_token_id == tok.eos_token_id
    for s in strings:
        assert loaded.encode(s) == tok.encode(s)
    chat = loaded.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True)
    assert chat == "1+2="


def test_tiny_random_model_builds_and_generates(char_tokenizer, tiny_model):
    tok = char_tokenizer
    assert tiny_model.config.vocab_size == len(tok)
    assert tiny_model.generation_config.pad_token_id == tok.pad_token_id
    assert tiny_model.generation_config.eos_token_id == tok.eos_token_id
    same = build_tiny_random_model(tok, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(tiny_model.parameters(), same.parameters()))
    batch = tok(["1+2=", "12+34="], return_tensors="pt", padding=True)
    out = tiny_model.generate(**batch, do_sample=True, max_new_tokens=5)
    assert out.shape[0] == 2 and 0 < out.shape[1] - batch["input_ids"].shape[1] <= 5
    wider = build_tiny_random_model(tok, seed=1, hidden_size=64, num_hidden_layers=1)
    assert wider.config.hidden_size == 64 and wider.config.num_hidden_layers == 1


def test_shipped_asset_loads_and_answers_in_boxed_format():
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size < 8_000_000
    assert tok.eos_token_id != tok.pad_token_id and model.generation_config.eos_token_id == tok.eos_token_id
    problems = [validation_problem(0, i) for i in range(16)]
    batch = tok([p["prompt"] for p in problems], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=False, max_new_tokens=12)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.startswith("\\boxed{") and t.endswith("}") for t in texts), texts
    assert sum(exact_match_reward(t, p["answer"]) for t, p in zip(texts, problems)) >= 12  # greedy mostly right
