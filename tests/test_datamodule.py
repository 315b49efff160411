"""PromptDataModule: sources, formatting, validation split, endless stream, exact resume, input errors."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from kpo_lightning.config import DataConfig
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.errors import UserInputError

RECORDS = [{"question": f"what is {i} plus {i}", "solution": 2 * i} for i in range(20)]


def write(path: Path, records: list[dict], fmt: str | None = None) -> Path:
    """Write records as .jsonl / .json / .csv / .parquet (chosen by the path's extension)."""
    fmt = fmt or path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == ".json":
        path.write_text(json.dumps(records))
    elif fmt == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def take(dm: PromptDataModule, n: int) -> list[dict]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def file_cfg(path: Path, **kw) -> DataConfig:
    kw.setdefault("val_size", 0)
    return DataConfig(source=str(path), prompt_key="question", answer_key="solution", **kw)


def word_tokenizer(chat_template: str | None = None):
    """A tiny whitespace WordLevel tokenizer built in code (one token per word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    if chat_template:
        tok.chat_template = chat_template
    return tok


# -- the built-in task ----------------------------------------------------------------------------------------


def test_arithmetic_stream_is_deterministic_with_batch_shape():
    cfg = DataConfig(source="arithmetic", prompts_per_step=4, val_size=6)
    a, b = PromptDataModule(cfg, seed=3), PromptDataModule(cfg, seed=3)
    batches = take(a, 5)
    assert batches == take(b, 5)
    assert batches != take(PromptDataModule(cfg, seed=4), 5)
    for batch in batches:
        assert set(batch) == {"prompt", "answer"}
        assert len(batch["prompt"]) == len(batch["answer"]) == 4
        assert all(isinstance(x, str) for x in batch["prompt"] + batch["answer"])
    val = a.val_prompts()
    assert len(val) == 6 and val == PromptDataModule(cfg, seed=3).val_prompts()
    train_prompts = {p for batch in take(PromptDataModule(cfg, seed=3), 200) for p in batch["prompt"]}
    assert not train_prompts & {v["prompt"] for v in val}
    assert [len(b["prompt"]) for b in a.iter_val_batches()] == [4, 2]


# -- local files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_file_formats_load_with_custom_keys(tmp_path, ext):
    path = write(tmp_path / f"data{ext}", RECORDS)
    cfg = file_cfg(path, val_size=2, prompts_per_step=6, shuffle=False, prompt_template="Q: {prompt}")
    PromptDataModule.check_source(cfg)
    dm = PromptDataModule(cfg)
    dm.setup()
    assert dm.val_prompts() == [{"prompt": f"Q: what is {i} plus {i}", "answer": str(2 * i)} for i in range(2)]
    (first,) = take(dm, 1)
    assert first["prompt"] == [f"Q: what is {i} plus {i}" for i in range(2, 8)]
    assert first["answer"] == [str(2 * i) for i in range(2, 8)]


def test_json_variants_and_nested_keys(tmp_path):
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"question": ["a", "b"], "solution": [1, 2]}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"question": "a", "solution": 1}, {"question": "b", "solution": 2}]}))
    two = [{"question": "a", "solution": 1}, {"question": "b", "solution": 2}]
    lines = write(tmp_path / "lines.json", two, ".jsonl")
    for path in (columns, wrapped, lines):
        (batch,) = take(PromptDataModule(file_cfg(path, prompts_per_step=2, shuffle=False)), 1)
        assert batch == {"prompt": ["a", "b"], "answer": ["1", "2"]}
    nested = write(
        tmp_path / "nested.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "x?"}],
                "reward_model": {"ground_truth": "7"},
            },
        ],
    )
    cfg = DataConfig(source=str(nested), answer_key="reward_model.ground_truth", val_size=0, prompts_per_step=1)
    assert take(PromptDataModule(cfg), 1) == [{"prompt": ["x?"], "answer": ["7"]}]


def test_val_split_is_held_out_and_disjoint(tmp_path):
    path = write(tmp_path / "data.jsonl", RECORDS)
    dm = PromptDataModule(file_cfg(path, val_size=5, prompts_per_step=3), seed=1)
    val = {r["prompt"] for r in dm.val_prompts()}
    assert val == {f"what is {i} plus {i}" for i in range(5)}
    seen = {p for batch in take(dm, 20) for p in batch["prompt"]}  # 60 prompts = 4 epochs of 15
    assert seen == {f"what is {i} plus {i}" for i in range(5, 20)}
    assert [len(b["prompt"]) for b in dm.val_dataloader()] == [3, 2]


def test_val_source_and_duplicates_of_val_are_not_trained_on(tmp_path):
    train = write(tmp_path / "train.jsonl", RECORDS)
    val = write(tmp_path / "val.csv", RECORDS[3:5] + [{"question": "other", "solution": 0}])
    dm = PromptDataModule(file_cfg(train, val_source=str(val), val_size=2, prompts_per_step=6))
    assert [r["prompt"] for r in dm.val_prompts()] == ["what is 3 plus 3", "what is 4 plus 4"]
    seen = {p for batch in take(dm, 6) for p in batch["prompt"]}
    assert seen == {f"what is {i} plus {i}" for i in range(20) if i not in (3, 4)}
    assert dm.num_skipped_val_overlap > 0


def test_endless_cycling_with_per_epoch_shuffle(tmp_path):
    path = write(tmp_path / "five.jsonl", RECORDS[:5])
    prompts = [p for b in take(PromptDataModule(file_cfg(path, prompts_per_step=2), seed=0), 10) for p in b["prompt"]]
    epochs = [prompts[i : i + 5] for i in range(0, 20, 5)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(r["question"] for r in RECORDS[:5])
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    again = [p for b in take(PromptDataModule(file_cfg(path, prompts_per_step=2), seed=0), 10) for p in b["prompt"]]
    assert again == prompts
    unshuffled = PromptDataModule(file_cfg(path, prompts_per_step=2, shuffle=False))
    plain = [p for b in take(unshuffled, 5) for p in b["prompt"]]
    assert plain == [r["question"] for r in RECORDS[:5]] * 2


# -- resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "arithmetic"])
def test_resume_gives_exactly_the_continuation(tmp_path, source):
    records = RECORDS[:7] + [{"question": "long " * 20, "solution": 0}]
    path = write(tmp_path / "seven.jsonl", records)
    if source == "file":
        cfg = file_cfg(path, prompts_per_step=3, max_prompt_tokens=10)
    else:
        cfg = DataConfig(source="arithmetic", prompts_per_step=3, val_size=4)
    tok = word_tokenizer()
    uninterrupted = PromptDataModule(cfg, tok, seed=5)
    full = take(uninterrupted, 20)

    first = PromptDataModule(cfg, tok, seed=5)
    it = iter(first.train_dataloader())
    assert [next(it) for _ in range(10)] == full[:10]
    state = first.state_dict()
    assert state["batches"] == 10

    resumed = PromptDataModule(cfg, tok, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == full[10:]
    assert resumed.state_dict() == uninterrupted.state_dict()
    if source == "file":  # the long record is skipped once per epoch: 20 batches = 60 prompts = 8+ epochs
        assert resumed.num_skipped_long >= 8

    # Loading a state into a module whose iterator is already running redirects that iterator too.
    live = PromptDataModule(cfg, tok, seed=5)
    live_it = iter(live.train_dataloader())
    next(live_it)
    live.load_state_dict(state)
    assert next(live_it) == full[10]


def test_resume_under_lightning_trainer_does_not_lose_the_prefetched_batch(tmp_path):
    """Lightning pre-fetches one batch ahead; the checkpoint must still resume at the first unused batch."""
    import lightning.pytorch as pl
    import torch

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["prompt"])
            return (self.w * 0).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )

    path = write(tmp_path / "data.jsonl", RECORDS[:7])
    cfg = file_cfg(path, prompts_per_step=2)
    full = Recorder()
    trainer(8).fit(full, datamodule=PromptDataModule(cfg, seed=2))

    part, dm = Recorder(), PromptDataModule(cfg, seed=2)
    t = trainer(4)
    t.fit(part, datamodule=dm)
    assert dm.state_dict()["batches"] == 4  # not 5: the pre-fetched batch was never used
    t.save_checkpoint(tmp_path / "step4.ckpt")
    rest = Recorder()
    trainer(8).fit(rest, datamodule=PromptDataModule(cfg, seed=2), ckpt_path=tmp_path / "step4.ckpt")
    assert part.seen + rest.seen == full.seen


# -- formatting and length ------------------------------------------------------------------------------------


def test_chat_template_applied():
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    cfg = DataConfig(
        source="arithmetic",
        chat_template=True,
        system_prompt="Be brief.",
        prompt_template="Compute {prompt}",
        prompts_per_step=2,
        val_size=1,
    )
    dm = PromptDataModule(cfg, word_tokenizer(template), seed=0)
    (batch,) = take(dm, 1)
    from kpo_lightning.data.arithmetic import arithmetic_problem

    raw = arithmetic_problem(0, 0, 99, split="train")["prompt"]
    assert batch["prompt"][0] == f"<system>Be brief.</system><user>Compute {raw}</user><assistant>"
    assert dm.val_prompts()[0]["prompt"].startswith("<system>Be brief.</system><user>Compute ")

    with pytest.raises(UserInputError, match="no chat template"):
        PromptDataModule(cfg, word_tokenizer(None)).setup()


def test_long_prompts_are_skipped_and_counted(tmp_path):
    records = [
        {"question": "short one", "solution": 1},
        {"question": "w " * 30, "solution": 2},
        {"question": "short two", "solution": 3},
        {"question": "x " * 30, "solution": 4},
    ]
    path = write(tmp_path / "mixed.jsonl", [{"question": "y " * 30, "solution": 0}] + records)
    dm = PromptDataModule(
        file_cfg(path, val_size=1, prompts_per_step=2, shuffle=False, max_prompt_tokens=5), word_tokenizer()
    )
    batches = take(dm, 3)
    assert all(b["prompt"] == ["short one", "short two"] for b in batches)
    assert dm.num_skipped_long == 5  # w, x in epochs 1-2; w in epoch 3 (its batch ends before x)
    assert dm.val_prompts() == [] and dm.num_skipped_long_val == 1
    # without a tokenizer there is no length check
    assert take(PromptDataModule(file_cfg(path, val_size=1, prompts_per_step=4, shuffle=False)), 1)[0]["answer"] == [
        "1",
        "2",
        "3",
        "4",
    ]


def test_every_prompt_too_long_is_an_input_error(tmp_path):
    path = write(tmp_path / "long.jsonl", [{"question": "w " * 30, "solution": 1}] * 3)
    dm = PromptDataModule(file_cfg(path, max_prompt_tokens=5), word_tokenizer())
    with pytest.raises(UserInputError, match="max_prompt_tokens"):
        take(dm, 1)


# -- streamed datasets (the hub path, fed from a local file) ----------------------------------------------------


def test_streaming_dataset_holds_out_val_and_resumes(tmp_path, monkeypatch):
    import datasets

    path = write(tmp_path / "stream.jsonl", RECORDS[:9])
    real_load = datasets.load_dataset

    def fake_load(name, subset=None, split=None, streaming=False):
        assert name == "someone/some-data" and streaming
        return real_load("json", data_files=str(path), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(
        source="someone/some-data", prompt_key="question", answer_key="solution", val_size=2, prompts_per_step=3
    )
    dm = PromptDataModule(cfg, seed=1)
    assert [r["answer"] for r in dm.val_prompts()] == ["0", "2"]
    full = take(dm, 8)  # 24 prompts over 7 training records: crosses epochs
    assert {p for b in full for p in b["prompt"]} == {f"what is {i} plus {i}" for i in range(2, 9)}

    first = PromptDataModule(cfg, seed=1)
    take(first, 5)
    resumed = PromptDataModule(cfg, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 3) == full[5:]


def test_hub_val_source_uses_its_own_subset_and_split(tmp_path, monkeypatch):
    import datasets

    path = write(tmp_path / "stream.jsonl", RECORDS[:9])
    real_load = datasets.load_dataset
    calls = []

    def fake_load(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split))
        return real_load("json", data_files=str(path), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(
        source="org/train-set",
        subset="en",
        split="train",
        val_source="org/eval-set",
        val_split="test",
        prompt_key="question",
        answer_key="solution",
        val_size=2,
        prompts_per_step=3,
    )
    dm = PromptDataModule(cfg, seed=1)
    assert len(dm.val_prompts()) == 2
    take(dm, 1)
    assert ("org/train-set", "en", "train") in calls and ("org/eval-set", None, "test") in calls


def test_hub_name_that_cannot_be_loaded(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    PromptDataModule.check_source(DataConfig(source="nobody/nothing"))  # hub names are checked on load
    with pytest.raises(UserInputError, match=r"nobody/nothing.*could not load.*local \.jsonl"):
        PromptDataModule(DataConfig(source="nobody/nothing")).setup()


# -- input errors ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserInputError, match="file not found") as e:
        PromptDataModule.check_source(DataConfig(source=str(path)))
    assert str(path) in str(e.value)
    with pytest.raises(UserInputError, match="file not found"):
        PromptDataModule.check_source(DataConfig(val_source="./data/val.parquet"))


def test_empty_file(tmp_path):
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(UserInputError, match="empty") as e:
            PromptDataModule.check_source(DataConfig(source=str(path)))
        assert str(path) in str(e.value)
    path = tmp_path / "none.json"
    path.write_text("[]")
    with pytest.raises(UserInputError, match="no records"):
        PromptDataModule.check_source(DataConfig(source=str(path)))


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2\n')
    with pytest.raises(UserInputError, match="line 3") as e:
        PromptDataModule.check_source(DataConfig(source=str(path)))
    assert str(path) in str(e.value)
    with pytest.raises(UserInputError, match="line 3"):
        PromptDataModule(DataConfig(source=str(path))).setup()


def test_missing_key_names_record_key_and_present_keys(tmp_path):
    path = write(tmp_path / "keys.jsonl", RECORDS[:3])
    with pytest.raises(UserInputError) as e:
        PromptDataModule.check_source(DataConfig(source=str(path)))  # default keys prompt/answer
    msg = str(e.value)
    assert str(path) in msg and "line 1" in msg and "'prompt'" in msg and "question" in msg and "solution" in msg
    # a later record missing the answer key is reported by setup with its line
    records = RECORDS[:3] + [{"question": "no answer here"}]
    path = write(tmp_path / "later.jsonl", records)
    with pytest.raises(UserInputError, match=r"later\.jsonl, line 4.*'solution'"):
        PromptDataModule(file_cfg(path)).setup()
    for ext in (".csv", ".parquet"):
        path = write(tmp_path / f"keys{ext}", RECORDS[:3])
        with pytest.raises(UserInputError, match="question") as e:
            PromptDataModule.check_source(DataConfig(source=str(path)))
        assert str(path) in str(e.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("what is 1 plus 1\n")
    with pytest.raises(UserInputError, match="unsupported file type '.txt'") as e:
        PromptDataModule.check_source(DataConfig(source=str(path)))
    assert str(path) in str(e.value)


def test_other_setting_errors(tmp_path):
    path = write(tmp_path / "data.jsonl", RECORDS[:3])
    with pytest.raises(UserInputError, match="val_size=3 holds out all"):
        PromptDataModule(file_cfg(path, val_size=3)).setup()
    with pytest.raises(UserInputError, match="prompt_template"):
        PromptDataModule.check_source(file_cfg(path, prompt_template="Solve {prompt} in \\boxed{}"))
    with pytest.raises(UserInputError, match="does not contain"):
        PromptDataModule.check_source(file_cfg(path, prompt_template="Solve it"))
    with pytest.raises(UserInputError, match="chat_template=true needs"):
        take(PromptDataModule(file_cfg(path, chat_template=True)), 1)


def test_validation_shares_are_equal_contiguous_and_flag_their_filler_rows():
    """Five prompts on two processes: 3 + 2 real ones, the short share filled up to 3 and flagged, so both
    processes run the same batches (FSDP's generate is a collective) and the gathered real rows are the prompts in
    order; on one process nothing is added."""
    dm = PromptDataModule(DataConfig(source="arithmetic", prompts_per_step=2, val_size=5), seed=0)
    dm.setup()
    every = [r["prompt"] for r in dm.val_prompts()]
    assert all("padding" not in b for b in dm.iter_val_batches())
    shares = [list(dm.iter_val_batches(rank=r, world_size=2)) for r in range(2)]
    assert [[len(b["prompt"]) for b in s] for s in shares] == [[2, 1], [2, 1]]
    flags = [[f for b in s for f in b["padding"]] for s in shares]
    assert flags == [[False, False, False], [False, False, True]]
    prompts = [p for s in shares for b in s for p in b["prompt"]]
    gathered = [p for p, pad in zip(prompts, flags[0] + flags[1]) if not pad]
    assert gathered == every
    # More processes than prompts: every process runs one batch, the empty shares all filler.
    shares = [list(dm.iter_val_batches(rank=r, world_size=8)) for r in range(8)]
    assert [sum(not f for b in s for f in b["padding"]) for s in shares] == [1, 1, 1, 1, 1, 0, 0, 0]
