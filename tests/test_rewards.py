"""Math reward (extraction, equivalence, time bounds), reward-function loading and batch scoring."""

import logging
import math
import sys
import textwrap
import threading
import time

import pytest
import torch

from kpo_lightning.config import RewardConfig
from kpo_lightning.errors import UserInputError
from kpo_lightning.rewards import answer_extraction
from kpo_lightning.rewards import math_reward as math_reward_module
from kpo_lightning.rewards import scoring as rewards
from kpo_lightning.rewards.scoring import extract_boxed, load_reward_fn, math_reward, score_completions


@pytest.fixture(autouse=True)
def _fresh_cache():
    math_reward_module._CACHE.clear()
    yield
    math_reward_module._CACHE.clear()


# ------------------------------------------------------------------------------------------ extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{12}.", "12"),
        (r"\boxed{1} no wait \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\boxed{\boxed{4}}", "4"),
        ("no box here", None),
        (r"\boxed{12", None),  # truncated
        (r"\boxed{1} then \boxed{2", None),  # the last box is unbalanced
        (r"\boxed{a\}", None),  # escaped brace does not close
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_long_text_is_fast():
    text = "x " * 100_000 + r"\boxed{" + "{}" * 20_000 + "3}"
    t = time.perf_counter()
    assert extract_boxed(text) == "{}" * 20_000 + "3"
    assert time.perf_counter() - t < 1.0


# ------------------------------------------------------------------------------------------ math_reward


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{1/2}", r"\frac12", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{ 12 }", "12", 1.0),
        (r"\boxed{12.0}", "12", 1.0),
        (r"\boxed{012}", "12", 1.0),
        (r"\boxed{x=3}", "3", 1.0),  # math-verify treats an assignment to a variable as its value
        (r"\boxed{3}", "x=3", 1.0),
        (r"first \boxed{7}, finally \boxed{12}", "12", 1.0),  # the last box wins
        (r"first \boxed{12}, finally \boxed{7}", "12", 0.0),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),  # nested braces
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
        ("the answer is 12", "12", 0.0),  # no box
        (r"\boxed{13}", "12", 0.0),
        (r"\boxed{\frac{1}{3}}", "0.33", 0.0),
        (r"\boxed{30^\circ}", "30", 1.0),  # units / degrees
        (r"\boxed{5\text{ cm}}", "5", 1.0),
        (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),  # sets
        (r"\boxed{(1,2]}", "(1,2]", 1.0),  # intervals
        (r"\boxed{[1,2]}", "(1,2]", 0.0),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        (r"\boxed{12}", r"\boxed{12}", 1.0),  # boxed reference
        (r"\boxed{}", "12", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_math_reward_fast_path_is_cheap():
    t = time.perf_counter()
    for i in range(1000):
        assert math_reward(rf"so \boxed{{{i}}}", str(i)) == 1.0
        assert math_reward(rf"so \boxed{{{i + 1}}}", str(i)) == 0.0
    assert (time.perf_counter() - t) / 2000 < 1e-3


PATHOLOGICAL = [
    "9^{9^{9^9}}",
    "10^{10^{100}}!",
    "(10^{100})!",
    r"\frac{" * 500 + "1" + "}{2}" * 500,
    r"\frac{" * 40 + "1" + "}{2}" * 40,
    "1+" * 50_000 + "1",
    "x" * 100_000,
]


def _time_all(timeout_s: float, results: list) -> None:
    for p in PATHOLOGICAL:
        t = time.perf_counter()
        r = math_reward(r"\boxed{" + p + "}", "5", timeout_s=timeout_s)
        results.append((p[:20], r, time.perf_counter() - t))


@pytest.mark.parametrize("where", ["main", "thread"])
def test_pathological_answers_are_bounded(where):
    timeout_s = 1.0
    math_reward(r"\boxed{x^2}", "x^2+0")  # start the worker outside the timed part
    results: list = []
    if where == "main":
        _time_all(timeout_s, results)
    else:
        th = threading.Thread(target=_time_all, args=(timeout_s, results))
        th.start()
        th.join(60)
        assert not th.is_alive()
    assert len(results) == len(PATHOLOGICAL)
    for name, r, elapsed in results:
        assert r == 0.0, name
        assert elapsed < 3 * timeout_s + 1.0, (name, elapsed)
    # the worker was replaced after its timeouts and still answers symbolic questions
    assert math_reward(r"\boxed{(x+1)^2}", "x^2+2x+1") == 1.0


def test_math_reward_in_threads_concurrently():
    out = [None] * 4

    def job(i):
        out[i] = math_reward(rf"\boxed{{\frac{{{2 * i + 2}}}{{4}}}}", f"{(i + 1) / 2}")

    threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert out == [1.0] * 4


def test_math_reward_rejects_bad_timeout():
    with pytest.raises(ValueError):
        math_reward(r"\boxed{1}", "1", timeout_s=0)


# ------------------------------------------------------------------------------------------ load_reward_fn


def test_load_builtin_math():
    fn = load_reward_fn("math")
    assert fn(prompt="p", completion=r"\boxed{4}", answer="4") == 1.0
    assert fn(prompt="p", completion=r"\boxed{5}", answer="4", extra="ignored") == 0.0


def test_load_module_and_file_forms(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "fns.py").write_text(
        textwrap.dedent("""
        def length(prompt, completion, answer, **kwargs):
            return float(len(completion))

        class Scorer:
            @staticmethod
            def exact(**kwargs):
                return float(kwargs["completion"] == kwargs["answer"])
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards_pkg.fns:length")
    assert fn(prompt="", completion="abc", answer="") == 3.0
    assert load_reward_fn("my_rewards_pkg.fns:Scorer.exact")(prompt="", completion="a", answer="a") == 1.0

    f = tmp_path / "sub" / "reward file.py"
    f.parent.mkdir()
    f.write_text("def r(prompt, completion, answer):\n    return 0.25\n")
    assert load_reward_fn(f"{f}:r")(prompt="", completion="", answer="") == 0.25
    monkeypatch.chdir(tmp_path)
    assert load_reward_fn("sub/reward file.py:r")(prompt="", completion="", answer="") == 0.25


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ("mathh", "not understood"),
        ("pkg.mod:", "not understood"),
        (":fn", "not understood"),
        ("not a module:fn", "neither a dotted module"),
        ("no_such_module_kpo_xyz:fn", "not found"),
        ("no_such_module_kpo_xyz.sub:fn", "not found"),
        ("json:no_such_function", "no attribute"),
        ("math:pi", "not callable"),
        ("json:loads", "called as"),  # loads() does not take prompt/completion/answer
        ("missing/file.py:fn", "does not exist"),
    ],
)
def test_load_reward_fn_errors(spec, match):
    with pytest.raises(UserInputError, match=match) as exc:
        load_reward_fn(spec)
    assert repr(spec.strip()) in str(exc.value) or spec == ""


def test_load_reward_fn_import_errors_in_user_code(tmp_path, monkeypatch):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(UserInputError, match="boom at import"):
        load_reward_fn(f"{broken}:fn")
    (tmp_path / "needs_dep_kpo.py").write_text("import not_installed_dep_kpo_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserInputError, match="needs 'not_installed_dep_kpo_xyz'"):
        load_reward_fn("needs_dep_kpo:fn")
    (tmp_path / "wrong_sig.py").write_text("def fn(text):\n    return 1.0\n")
    with pytest.raises(UserInputError, match="prompt"):
        load_reward_fn(f"{tmp_path / 'wrong_sig.py'}:fn")
    sys.modules.pop("needs_dep_kpo", None)


# ------------------------------------------------------------------------------------------ score_completions


def test_score_completions_counts_failures(caplog):
    def fn(prompt, completion, answer, **kwargs):
        kind = completion
        if kind.startswith("raise"):
            raise ValueError(f"bad sample {kind}")
        return {
            "none": None,
            "nan": math.nan,
            "inf": -math.inf,
            "str": "1.0",
            "list": [1.0],
            "int": 1,
            "bool": True,
            "tensor": torch.tensor(0.5),
            "float": 0.75,
            "big": torch.ones(2),
        }[kind]

    kinds = ["float", "raise1", "none", "nan", "inf", "str", "int", "raise2", "bool", "tensor", "list", "big"]
    n = len(kinds)
    with caplog.at_level(logging.WARNING, logger="kpo_lightning.rewards.scoring"):
        r, errors, timeouts = score_completions(fn, ["p"] * n, kinds, ["a"] * n)
    assert r.dtype == torch.float32 and r.shape == (n,)
    expected = [0.75, 0, 0, 0, 0, 0, 1.0, 0, 1.0, 0.5, 0, 0]
    assert r.tolist() == expected
    assert errors == 8 and timeouts == 0
    msgs = [rec.getMessage() for rec in caplog.records]
    assert sum("raised ValueError" in m for m in msgs) == 1  # the first of each kind, not every one
    assert any("bad sample raise1" in m and "2/12" in m for m in msgs)
    assert any("returned None" in m for m in msgs)
    assert any("NaN/inf" in m for m in msgs)
    assert any("non-number" in m for m in msgs)


def test_score_completions_with_math_and_length_mismatch():
    fn = load_reward_fn("math")
    r, errors, timeouts = score_completions(fn, ["q", "q"], [r"\boxed{2}", "no box"], ["2", "2"])
    assert r.tolist() == [1.0, 0.0] and errors == 0 and timeouts == 0
    with pytest.raises(ValueError, match="one entry per sample"):
        score_completions(fn, ["q"], ["a", "b"], ["x", "y"])


# ------------------------------------------------------------------------------------------ answer formats


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        # separate numbers are never joined (math-verify alone would read "2 3/4" as 5/4 and "1 2" as 3)
        (r"\boxed{2 3/4}", "23/4", 0.0),
        (r"\boxed{23/4}", "2 3/4", 0.0),
        (r"\boxed{1 2}", "12", 0.0),
        (r"\boxed{12}", "1 2", 0.0),
        (r"\boxed{1 2}", "3", 0.0),
        (r"\boxed{1~2}", "12", 0.0),
        (r"\boxed{1\ 2}", "12", 0.0),
        (r"\boxed{1  2}", "1 2", 1.0),  # the same separate numbers
        # mixed numbers
        (r"\boxed{2 3/4}", r"\frac{11}{4}", 1.0),
        (r"\boxed{2\frac{3}{4}}", "11/4", 1.0),
        (r"\boxed{2 \frac34}", "2.75", 1.0),
        (r"\boxed{-2 3/4}", r"-\frac{11}{4}", 1.0),
        (r"\boxed{2\frac{3}{4}}", r"\frac{3}{2}", 0.0),
        (r"\boxed{2\dfrac{3}{4}}", r"2\frac{3}{4}", 1.0),
        # \frac, \dfrac, \tfrac
        (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
        (r"\boxed{\tfrac34}", r"\frac{3}{4}", 1.0),
        (r"\boxed{\dfrac{3}{4}}", r"\frac{4}{3}", 0.0),
        # thousands separators
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{1000}", "1{,}000", 1.0),
        (r"\boxed{1,\!000}", "1000", 1.0),
        (r"\boxed{1\,000}", "1000", 1.0),
        (r"\boxed{10,000,000}", "10000000", 1.0),
        (r"\boxed{-1,234.5}", "-1234.5", 1.0),
        (r"\boxed{1,000}", "100", 0.0),
        (r"\boxed{1 000}", "1000", 0.0),  # a plain space is not a thousands separator: separate numbers
        (r"\boxed{(100,200)}", "100200", 0.0),  # a pair, not a number with a separator
        # units and \text{}
        (r"\boxed{5\text{ cm}}", "5", 1.0),
        (r"\boxed{5 \text{ cm}}", "5", 1.0),
        (r"\boxed{\$10}", "10", 1.0),
        (r"\boxed{\text{(A)}}", "A", 1.0),
        (r"\boxed{\text{Monday}}", "Monday", 1.0),
        (r"\boxed{\text{ Monday }}", r"\text{Monday}", 1.0),
        (r"\boxed{\pi r^2}", r"\pi r^{2}", 1.0),
        (r"\boxed{1, 2}", "1,2", 1.0),
    ],
)
def test_math_reward_answer_formats(completion, answer, expected):
    assert math_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("1 2", "1 2"),
        ("1   2", "1 2"),
        (r"1\,2", "1 2"),
        ("x y", "x y"),
        (r"\pi r", r"\pi r"),
        ("2 x", "2x"),
        ("1, 2", "1,2"),
        (r"\left( 1 \right)", "(1)"),
        ("1,000", "1000"),
        ("(1,000)", "(1,000)"),
        ("2 3/4", r"2\frac{3}{4}"),
        ("2 5/4", "2 5/4"),
        ("$12$.", "12"),
    ],
)
def test_normalise_keeps_separate_numbers_apart(raw, normalised):
    assert answer_extraction._normalise(raw) == normalised


# ------------------------------------------------------------------------------------------ thinking models


@pytest.mark.parametrize(
    "completion, prompt, expected",
    [
        ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "", " so \\boxed{2}"),
        ("<think>a</think><think>b</think>final", "", "final"),  # after the last one
        ("reasoning \\boxed{1}</think>answer", "<|im_start|>assistant\n<think>\n", "answer"),  # template opened it
        ("<think>still thinking \\boxed{1}", "", None),  # never closed: no answer
        ("still thinking \\boxed{1}", "<|im_start|>assistant\n<think>\n", None),
        ("plain \\boxed{1}", "", "plain \\boxed{1}"),
        ("plain", "use <think> and </think> tags", "plain"),  # the prompt closed what it opened
    ],
)
def test_answer_part(completion, prompt, expected):
    assert rewards.answer_part(completion, prompt) == expected


def test_math_reward_reads_after_think():
    text = r"<think>try \boxed{7}... no, it is 12</think> The answer is \boxed{12}."
    assert math_reward(text, "12") == 1.0
    assert math_reward(r"<think>\boxed{12}</think> so \boxed{7}", "12") == 0.0  # the thought is not the answer
    assert math_reward(r"<think>\boxed{12}", "12") == 0.0  # unterminated thinking scores 0
    # answer_after_think=False: the last box anywhere (pre-thinking-model behaviour)
    assert math_reward(r"<think>\boxed{12}", "12", answer_after_think=False) == 1.0
    assert math_reward(r"<think>\boxed{12}</think> so \boxed{7}", "7", answer_after_think=False) == 1.0
    # through the config and the reward-function calling convention, with the prompt deciding an open <think>
    on = rewards.reward_from_config(RewardConfig(answer_after_think=True))
    off = rewards.reward_from_config(RewardConfig(answer_after_think=False))
    prompt = "<|im_start|>assistant\n<think>\n"
    assert on(prompt=prompt, completion=r"\boxed{12}", answer="12") == 0.0
    assert on(prompt=prompt, completion=r"\boxed{7}</think>\boxed{12}", answer="12") == 1.0
    assert off(prompt=prompt, completion=r"\boxed{12}", answer="12") == 1.0
    r, _, _ = score_completions(on, [prompt, ""], [r"\boxed{12}", r"\boxed{12}"], ["12", "12"])
    assert r.tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------ math timeouts


def test_timeout_reaches_the_checker_and_is_never_cached(monkeypatch):
    from kpo_lightning.rewards import math_verify_worker

    calls = []
    answers = iter([None, True])  # first a timeout, then the real verdict

    def fake_equal(gold, pred, timeout_s):
        calls.append((gold, pred, timeout_s))
        return next(answers)

    monkeypatch.setattr(math_verify_worker.WORKER, "equal", fake_equal)
    fn = rewards.reward_from_config(RewardConfig(timeout_s=0.7))
    batch = ([""] * 3, [r"\boxed{x^2}", r"\boxed{x^2}", r"\boxed{5}"], ["x*x", "x*x", "5"])
    r, errors, timeouts = score_completions(fn, *batch)
    assert r.tolist() == [0.0, 0.0, 1.0] and timeouts == 2 and errors == 0
    assert calls == [("x*x", "x^2", 0.7)]  # the configured bound, and identical pairs checked once per batch
    assert ("x*x", "x^2") not in math_reward_module._CACHE  # a timeout is not a verdict
    r, errors, timeouts = score_completions(fn, *batch)  # asked again: checked again, now answered
    assert r.tolist() == [1.0, 1.0, 1.0] and timeouts == 0
    assert len(calls) == 2 and math_reward_module._CACHE[("x*x", "x^2")] == 1.0
    score_completions(fn, *batch)
    assert len(calls) == 2  # a verdict is cached


def test_real_timeout_is_counted():
    fn = rewards.MathReward(timeout_s=0.5)
    math_reward(r"\boxed{x^2}", "x^2+0")  # start the worker outside the timed part
    t = time.perf_counter()
    r, errors, timeouts = score_completions(
        fn, ["", "", ""], [r"\boxed{9^{9^{9^9}}}"] * 2 + [r"\boxed{3}"], ["5", "5", "3"]
    )
    assert r.tolist() == [0.0, 0.0, 1.0] and timeouts == 2 and errors == 0
    assert time.perf_counter() - t < 3 * 0.5 + 1.0  # the identical pair was checked once
    assert list(math_reward_module._CACHE) == [("x^2+0", "x^2")]  # the warm-up's verdict; the timeout is not cached


# ------------------------------------------------------------------------------------------ config keys


@pytest.mark.parametrize(
    "override, needle",
    [
        ("reward.num_workers=-1", "reward.num_workers"),
        ("reward.answer_after_think=maybe", "reward.answer_after_think"),
        ("reward.timeout_s=0", "reward.timeout_s"),
    ],
)
def test_reward_config_errors_are_one_line(capsys, override, needle):
    from kpo_lightning.cli.main import main

    assert main([override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_reward_config_values_reach_the_reward(tmp_path):
    from kpo_lightning.cli.config_loading import load_config

    cfg = load_config(["reward.timeout_s=3.5", "reward.answer_after_think=false"])
    fn = rewards.reward_from_config(cfg.reward)
    assert fn == rewards.MathReward(timeout_s=3.5, answer_after_think=False)
    f = tmp_path / "r.py"
    f.write_text("def score(prompt, completion, answer, **kw):\n    return 0.5\n")
    cfg = load_config([f"reward.fn={f}:score", "reward.num_workers=3", "reward.timeout_s=4"])
    fn = rewards.reward_from_config(cfg.reward)
    assert isinstance(fn, rewards.TimedReward) and (fn.num_workers, fn.timeout_s) == (3, 4.0)
    assert load_config([]).reward == RewardConfig()  # defaults: math, 2.0 s, answer after </think>, auto workers
