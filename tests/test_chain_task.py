"""The chained-addition task (`data.source=chain`), its config keys, preset and the shipped tiny-chain asset."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kpo_lightning.cli.main import main
from kpo_lightning.config import DataConfig
from kpo_lightning.data.chain_arithmetic import (
    CHAIN_VAL_SEED_OFFSET,
    ChainSource,
    chain_problem,
    chain_solution,
    chain_validation_problem,
    curriculum_cap,
    is_val_chain,
)
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.rewards.scoring import math_reward

ASSET = Path(__file__).resolve().parents[1] / "kpo_lightning" / "assets" / "tiny-chain"


def operands(prompt: str) -> list[int]:
    assert prompt.endswith("=")
    return [int(x) for x in prompt[:-1].split("+")]


def take(dm: PromptDataModule, n: int) -> list[dict]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


# -- the generator ------------------------------------------------------------------------------------------------


def test_solution_is_written_step_by_step():
    assert chain_solution([12, 34, 56]) == "12+34=46;46+56=102;\\boxed{102}"


def test_problems_are_deterministic_correct_and_in_range():
    first = [chain_problem(7, i) for i in range(300)]
    assert first == [chain_problem(7, i) for i in range(300)]
    assert first != [chain_problem(8, i) for i in range(300)]
    for p in first:
        ops = operands(p["prompt"])
        assert 5 <= len(ops) <= 16 and all(1 <= x <= 9 for x in ops)
        assert p["answer"] == str(sum(ops)) and p["completion"] == chain_solution(ops)
        assert p["completion"].endswith("\\boxed{" + p["answer"] + "}")
    assert {len(operands(p["prompt"])) for p in first} == set(range(5, 17))  # every length occurs
    assert [len(operands(chain_problem(0, i, 3, 3)["prompt"])) for i in range(20)] == [3] * 20


def test_reference_traces_are_30_to_150_tokens():
    # one character a token (the char tokenizer), plus eos; the extremes are 34 (5 ones) and 140 (16 nines)
    lengths = [len(chain_problem(0, i)["completion"]) + 1 for i in range(2000)]
    assert 30 <= min(lengths) and max(lengths) <= 150
    assert len(chain_solution([1] * 5)) + 1 == 34 and len(chain_solution([9] * 16)) + 1 == 140


def test_curriculum_grows_the_operand_cap_from_min_to_max():
    assert [curriculum_cap(i, 4, 12, 80) for i in (0, 9, 10, 40, 79, 80, 10_000)] == [4, 4, 5, 8, 11, 12, 12]
    assert curriculum_cap(0, 4, 12, 0) == 12  # 0: no curriculum
    counts = [len(operands(chain_problem(1, i, 5, 16, curriculum_prompts=440)["prompt"])) for i in range(880)]
    assert all(n <= curriculum_cap(i, 5, 16, 440) for i, n in enumerate(counts))
    assert max(counts[:40]) == 5 and set(counts[440:]) == set(range(5, 17))
    early, late = sum(counts[:220]) / 220, sum(counts[660:]) / 220
    assert early < 8 and late > 9.5  # measured 6.2 and 10.5 (uniform over 5..16 averages 10.5)


def test_held_out_split_is_disjoint_from_training_problems():
    train = [chain_problem(0, i, 4, 5) for i in range(20_000)]
    val = [chain_validation_problem(0, i, 4, 5) for i in range(500)]
    assert not any(is_val_chain(operands(p["prompt"])) for p in train)
    assert all(is_val_chain(operands(p["prompt"])) for p in val)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    share = sum(is_val_chain(operands(chain_problem(0, i, split="val")["prompt"])) for i in range(50))
    assert share == 50
    assert chain_validation_problem(3, 5) == chain_problem(3 + CHAIN_VAL_SEED_OFFSET, 5, split="val")
    lengths = {len(operands(chain_validation_problem(0, i, 5, 16)["prompt"])) for i in range(300)}
    assert lengths == set(range(5, 17))  # validation spans all lengths whatever the curriculum


def test_bad_settings_are_refused():
    for args in ((1, 4), (5, 4), (5, 41)):
        with pytest.raises(ValueError):
            chain_problem(0, 0, *args)
    with pytest.raises(ValueError):
        chain_problem(0, 0, split="test")
    with pytest.raises(ValueError):
        ChainSource(0, 4, 12, -1)


# -- through the data module ------------------------------------------------------------------------------------


def chain_cfg(**kw) -> DataConfig:
    kw.setdefault("prompts_per_step", 4)
    kw.setdefault("val_size", 6)
    return DataConfig(source="chain", **kw)


def test_datamodule_stream_is_seeded_with_curriculum_and_held_out_val():
    cfg = chain_cfg(chain_curriculum_prompts=40)
    a = PromptDataModule(cfg, seed=3)
    batches = take(a, 20)
    assert batches == take(PromptDataModule(cfg, seed=3), 20)
    assert batches != take(PromptDataModule(cfg, seed=4), 20)
    prompts = [p for b in batches for p in b["prompt"]]
    assert prompts == [chain_problem(3, i, 5, 16, 40)["prompt"] for i in range(80)]
    assert all(int(ans) == sum(operands(p)) for b in batches for p, ans in zip(b["prompt"], b["answer"]))
    assert max(len(operands(p)) for p in prompts[:8]) <= 7 and max(len(operands(p)) for p in prompts[40:]) > 12
    val = a.val_prompts()
    assert [v["prompt"] for v in val] == [chain_validation_problem(3, i)["prompt"] for i in range(6)]
    train = {p for b in take(PromptDataModule(cfg, seed=3), 300) for p in b["prompt"]}
    assert not train & {v["prompt"] for v in val}


def test_resume_gives_exactly_the_continuation():
    cfg = chain_cfg(prompts_per_step=3, chain_curriculum_prompts=30)
    full = take(PromptDataModule(cfg, seed=5), 20)
    first = PromptDataModule(cfg, seed=5)
    it = iter(first.train_dataloader())
    assert [next(it) for _ in range(10)] == full[:10]
    state = first.state_dict()
    assert state["batches"] == 10 and state["index"] == 30 and state["source"] == "chain"
    resumed = PromptDataModule(cfg, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == full[10:]  # the curriculum continues where it was, too


# -- config keys and the preset ---------------------------------------------------------------------------------


def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("data.chain_min_operands=1", ["data.chain_min_operands=1", ">= 2"]),
        ("data.chain_max_operands=3", ["data.chain_max_operands=3", "data.chain_min_operands=5"]),
        ("data.chain_max_operands=41", ["data.chain_max_operands=41", "40"]),
        ("data.chain_curriculum_prompts=-1", ["data.chain_curriculum_prompts=-1", ">= 0"]),
        ("data.chain_curriculum_prompts=x", ["data.chain_curriculum_prompts"]),
    ],
)
def test_chain_config_errors(capsys, override, needles):
    code, err = run_main(capsys, "data.source=chain", override)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_preset_selects_the_task_and_model(capsys):
    assert main(["preset=chain", "--print-config"]) == 0
    out = capsys.readouterr().out
    for needle in ("source: chain", "name_or_path: tiny-chain", "chain_curriculum_prompts: 160", "max_new_tokens: 160"):
        assert needle in out, needle


# -- the shipped model ------------------------------------------------------------------------------------------


def test_reward_of_a_correct_and_an_incorrect_trace():
    p = chain_problem(0, 0)
    assert math_reward(p["completion"], p["answer"]) == 1.0
    wrong = p["completion"].replace("\\boxed{" + p["answer"], "\\boxed{" + str(int(p["answer"]) + 1))
    assert math_reward(wrong, p["answer"]) == 0.0
    assert math_reward(p["completion"].split("\\boxed")[0], p["answer"]) == 0.0  # steps but no boxed answer


def test_shipped_asset_loads_round_trips_and_generates():
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 8_000_000
    p = chain_validation_problem(0, 0)
    ids = tok.encode(p["prompt"] + p["completion"], add_special_tokens=False)
    assert len(ids) == len(p["prompt"] + p["completion"]) and tok.unk_token_id not in ids  # one char a token
    assert tok.decode(ids, skip_special_tokens=True) == p["prompt"] + p["completion"]
    assert model.generation_config.eos_token_id == tok.eos_token_id != tok.pad_token_id
    problems = [chain_validation_problem(0, i) for i in range(8)]
    batch = tok([q["prompt"] for q in problems], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=False, max_new_tokens=160)
    assert out.shape[0] == 8 and out.shape[1] - batch["input_ids"].shape[1] <= 160
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    # greedy traces have the task's shape: steps joined by ';' and a boxed answer at the end
    assert all(t.endswith("}") and "\\boxed{" in t and t.count(";") >= 3 for t in texts), texts


def test_preset_trains_a_few_steps_with_long_responses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code = main(
        [
            "preset=chain",
            f"output_dir={out}",
            "trainer.max_steps=2",
            "data.prompts_per_step=4",
            "optim.num_minibatches=2",
            "data.val_size=4",
            "eval.every_n_steps=2",
            "eval.k=1",
            "log.samples_every_n_steps=0",
            "log.ratio_plot_every_n_steps=0",
        ]
    )
    assert code == 0 and (out / "final" / "model.safetensors").exists()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    lengths = [e.value for e in acc.Scalars("train/response_length")]
    assert len(lengths) == 2 and all(30 <= n <= 150 for n in lengths), lengths  # the task's long responses
    assert len(acc.Scalars("val/accuracy")) == 2  # before training and at step 2
