"""`preset=smollm2`: its config loads and passes the checks, the prompt SmolLM2 sees for a record is the one the
preset was tuned on, and the preset's reward scores SmolLM2's natural answer formats (no optional install needed:
the SmolLM2 chat template is copied here and applied with a tokenizer built in code)."""

import pytest

from kpo_lightning.cli.config_checks import check_config
from kpo_lightning.cli.config_loading import load_config
from kpo_lightning.cli.main import main
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.rewards.lenient_reward import extract_answer, score
from kpo_lightning.rewards.scoring import load_reward_fn

# SmolLM2-135M-Instruct's chat template, as shipped in its GGUF file (tokenizer.chat_template).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def cfg():
    return load_config(["preset=smollm2"])


def test_preset_loads_and_passes_checks(cfg, capsys):
    check_config(cfg)
    assert cfg.model.name_or_path == "smollm2"
    assert cfg.data.source == "arithmetic" and cfg.data.chat_template
    assert cfg.loss.type == "kpo_clipped"
    assert cfg.reward.fn == "kpo_lightning.rewards.lenient_reward:score"
    assert load_reward_fn(cfg.reward.fn) is score
    assert main(["preset=smollm2", "--print-config"]) == 0
    assert "name_or_path: smollm2" in capsys.readouterr().out


def test_prompt_the_model_sees(cfg, char_tokenizer):
    char_tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    dm = PromptDataModule(cfg.data, tokenizer=char_tokenizer, seed=cfg.seed)
    record = {"prompt": "8+7=", "answer": "15"}
    # Exactly what the preset was measured with (scripts/probe_smollm2.py): a short system prompt instead of
    # SmolLM2's default one, and a phrasing the model answers with a plain number about 1/3 of the time.
    assert dm.format_prompt(record["prompt"]) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 8+7= Answer with just the number.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # one-digit operands and temperature 0.7 (rollouts and validation alike): the model's starting accuracy
    # was measured there; at temperature 1 or with two-digit operands it is near 0 and nothing is learned
    assert cfg.data.arithmetic_max_operand == 9
    assert cfg.rollout.temperature == cfg.eval.temperature == 0.7


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is 15.", 1.0),
        ("15", 1.0),
        ("\\boxed{15}", 1.0),
        ("8 + 7 = 15", 1.0),  # the last number counts, not the operands
        ("So the result is 15.0", 1.0),
        ("The answer is 15. I hope this helps!", 1.0),
        ("First 8 + 7 is 14, so \\boxed{15}", 1.0),  # a box wins over later or earlier numbers
        ("\\boxed{15} is wrong, it is 16", 1.0),
        ("The answer is 14.", 0.0),
        ("\\boxed{16}", 0.0),
        ("8 + 7", 0.0),  # only the operands: the last number is 7
        ("fifteen", 0.0),  # no number
        ("", 0.0),
        ("-15", 0.0),
        ("150", 0.0),
    ],
)
def test_reward_reads_natural_answer_formats(completion, expected):
    assert score(prompt="8+7=", completion=completion, answer="15") == expected


def test_extract_answer_forms():
    assert extract_answer("It is 1,234 apples.") == "1,234"
    assert score(prompt="", completion="It is 1,234 apples.", answer="1234") == 1.0
    assert extract_answer("The total is \\boxed{7} (not 8)") == "7"
    assert extract_answer("nothing here") is None
