"""Evaluation: unbiased pass@k, avg@k, benchmark layouts, and `run.py mode=eval` per dataset."""

import itertools
import json

import pytest
import torch

from kpo_lightning.cli.main import main
from kpo_lightning.rollout.evaluation import pass_at_k, summarize


@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 6, 4), (8, 3, 8)])
def test_pass_at_k_is_the_probability_a_random_k_subset_holds_a_correct_sample(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_summarize_avg_and_pass():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    out = summarize(rewards, 4)
    assert out["accuracy"] == pytest.approx(5 / 12)
    assert out["pass@4"] == pytest.approx(2 / 3)


def test_eval_mode_per_dataset_with_benchmark_layouts(tmp_path, char_tokenizer, tiny_model, capsys):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    math500 = tmp_path / "math500.jsonl"  # MATH-500 layout: problem / answer
    math500.write_text("".join(json.dumps({"problem": f"{i}+1=", "answer": "42", "level": 1}) + "\n" for i in range(4)))
    gsm8k = tmp_path / "gsm8k.jsonl"  # GSM8K layout: question / answer ending in "#### N"
    gsm8k.write_text(
        "".join(
            json.dumps({"question": f"{i}*2=", "answer": f"Some steps.\n#### {42 if i % 2 else '1,042'}"}) + "\n"
            for i in range(4)
        )
    )
    aime = tmp_path / "aime.jsonl"  # AIME 2024 dump layout: Problem / Answer
    aime.write_text("".join(json.dumps({"ID": i, "Problem": f"{i}-1=", "Answer": 7}) + "\n" for i in range(2)))
    reward = tmp_path / "reward.py"
    reward.write_text("def fn(prompt, completion, answer, **kw):\n    return 1.0 if answer == '42' else 0.0\n")

    out = tmp_path / "eval"
    code = main(
        [
            "mode=eval",
            f"model.name_or_path={model_dir}",
            f"data.source={math500},{gsm8k},{aime}",
            "eval.k=3",
            "rollout.max_new_tokens=4",
            f"reward.fn={reward}:fn",
            f"output_dir={out}",
            "data.val_size=64",
        ]
    )
    assert code == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results[str(math500)]["accuracy"] == 1.0 and results[str(math500)]["pass@3"] == 1.0
    assert results[str(gsm8k)]["accuracy"] == 0.5  # "#### 42" -> "42", "#### 1,042" -> "1042"
    assert results[str(aime)]["accuracy"] == 0.0 and results[str(aime)]["num_prompts"] == 2
    printed = capsys.readouterr().out
    assert f"{gsm8k}: avg@3=0.5000 pass@3=0.5000" in printed
    assert any((out / "tensorboard_eval").iterdir())


def test_eval_with_no_prompt_left_is_one_line(tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=" * 50, "answer": "2"}) + "\n")
    code = main(["mode=eval", f"data.source={data}", "data.max_prompt_tokens=8", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no prompt left to evaluate" in err and str(data) in err, err
    assert "Traceback" not in err
