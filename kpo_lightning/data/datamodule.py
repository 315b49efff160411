"""`PromptDataModule`: an endless, resumable stream of prompts for RL, plus a fixed validation list.

Sources (`data.source`, and `data.val_source` when set):

* ``arithmetic``: the built-in seeded task (`kpo_lightning.data.arithmetic`); validation uses its held-out stream.
* ``chain``: the built-in chained-addition task (`kpo_lightning.data.chain_arithmetic`), likewise.
* a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file (or a local dataset folder);
* anything else: a Hugging Face dataset name, loaded with
  ``datasets.load_dataset(name, data.subset, split=data.split, streaming=data.streaming)``.

Records give the prompt text (`data.prompt_key`) and the reference answer (`data.answer_key`, made a str). A key
may be a dotted path into nested records (``reward_model.ground_truth``), and a prompt may be a list of chat
messages (the last user message's content is used). The text is formatted with `data.prompt_template`, then
wrapped with the tokenizer's chat template when `data.chat_template` is true (`data.chat_template_kwargs` are
passed to it as template variables). Prompts longer than `data.max_prompt_tokens` tokens (counted as the sampler
tokenizes them, see `prompt_tokens`) are skipped and counted (only when a tokenizer is given).

Validation: `data.val_size` prompts, from `data.val_source` when set, otherwise held out from the source (the
first `val_size` records of a file or dataset, or the held-out arithmetic stream). Training prompts whose text
equals a validation prompt are skipped too, so validation never leaks into training.

Training position is state. The stream is a pure function of (source, seed, position): finite sources are
cycled in epochs, each shuffled by a generator seeded from (seed, epoch). `state_dict()` records how far
training has consumed the stream; `load_state_dict()` makes the next batch exactly the one an uninterrupted
run would have seen. Under a Lightning `Trainer` a batch counts as consumed when Lightning hands it to the
training step (`on_before_batch_transfer`), so the batch Lightning pre-fetches is not lost on resume; outside a
Trainer a batch counts as consumed when it is yielded. Streaming hub datasets have no random access: resuming
one re-reads its current epoch from the start and discards the records already used (slow for huge datasets,
but exact).

Where the parts live: reading files and hub datasets into (prompt, answer) pairs in `records.py`; the training
sources (`read(epoch, index)`: list, arithmetic, stream) in `prompt_sources.py`; `data.prompt_template` and
`data.chat_template_kwargs` in `prompt_template.py`. This file chooses the source for a configured name
(`_classify`, `PromptDataModule._load`) and holds the stream, its resumable position and the DataModule.
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kpo_lightning.config import DataConfig
from kpo_lightning.data.prompt_sources import STREAM_SHUFFLE_BUFFER, _ArithmeticSource, _ListSource, _StreamSource
from kpo_lightning.data.prompt_template import _apply_template, _check_chat_template_kwargs
from kpo_lightning.data.prompt_tokens import encode_prompt
from kpo_lightning.data.records import FILE_EXTENSIONS, Pair, _extract, _load_hub, _read_file
from kpo_lightning.errors import UserInputError

# Extensions that say "this is meant to be a file", so a missing one is reported as a missing file rather than
# tried as a hub dataset name.
_PATH_LIKE_EXTENSIONS = FILE_EXTENSIONS + (".txt", ".tsv", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".ndjson")
MAX_CONSECUTIVE_SKIPS = 100_000  # endless sources: this many unusable prompts in a row is an input error
STATE_FORMAT = 1
VAL_PADDING = "padding"  # key of a validation batch's per-prompt flags: True for a filler row (see iter_val_batches)


# ----------------------------------------------------------------------------------------------------------
# Selecting the source: `data.source` -> a kind (`_classify`) -> a training source (`PromptDataModule._load`)
# ----------------------------------------------------------------------------------------------------------


def _classify(source: str, key: str) -> str:
    """'arithmetic', 'chain', 'file', 'dir' (a local dataset folder) or 'hub'; raises for a missing or unsupported
    file."""
    if source in ("arithmetic", "chain"):
        return source
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return "dir"
    if path.is_file():
        if suffix not in FILE_EXTENSIONS:
            raise UserInputError(
                f"{key}={source!r}: unsupported file type {suffix or '(no extension)'!r}; use one of "
                f"{', '.join(FILE_EXTENSIONS)}"
            )
        return "file"
    looks_like_path = (
        suffix in _PATH_LIKE_EXTENSIONS
        or source.startswith(("/", "./", "../", "~"))
        or "\\" in source
        or source.count("/") > 1  # hub names are "name" or "owner/name"
    )
    if looks_like_path:
        hint = ""
        if suffix and suffix not in FILE_EXTENSIONS:
            hint = f" (and {suffix!r} files are not supported: use {', '.join(FILE_EXTENSIONS)})"
        raise UserInputError(
            f"{key}={source!r}: file not found (looked at {path.absolute()}){hint}; check the path, or use "
            f"'arithmetic' or a Hugging Face dataset name"
        )
    return "hub"


# ----------------------------------------------------------------------------------------------------------
# Settings checks
# ----------------------------------------------------------------------------------------------------------


def _check_settings(cfg: DataConfig) -> None:
    """The data settings the DataModule relies on (ranges and the prompt template)."""
    if cfg.prompts_per_step < 1:
        raise UserInputError(f"data.prompts_per_step={cfg.prompts_per_step!r} is invalid: it must be >= 1")
    if cfg.val_size < 0:
        raise UserInputError(f"data.val_size={cfg.val_size!r} is invalid: it must be >= 0 (0 disables validation)")
    _check_chat_template_kwargs(cfg.chat_template_kwargs)
    marker = "\x00prompt\x00"
    if marker not in _apply_template(cfg.prompt_template, marker):
        raise UserInputError(
            f"data.prompt_template={cfg.prompt_template!r} does not contain {{prompt}}, so the prompt would be dropped"
        )


# ----------------------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where the training stream stands: the next record is `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0
    batches: int = 0  # training batches handed out
    skipped_long: int = 0  # training prompts over data.max_prompt_tokens
    skipped_val_overlap: int = 0  # training prompts identical to a validation prompt


class _TrainStream(IterableDataset):
    """Endless training batches; the position lives in the DataModule, so every new iterator (and a
    `load_state_dict` in between) continues from the DataModule's state."""

    def __init__(self, dm: PromptDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        self.dm._restart_stream()
        while True:
            yield self.dm._next_train_batch()


class _BatchList(Dataset):
    """Pre-chunked validation batches."""

    def __init__(self, batches: list[dict[str, list[str]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, list[str]]:
        return self.batches[i]


def _as_is(batch: Any) -> Any:
    """collate_fn that keeps the dataset's batch as it is (the default would copy lists of str)."""
    return batch


class PromptDataModule(pl.LightningDataModule):
    """Prompts for RL rollouts: `{"prompt": [str], "answer": [str]}` batches of `data.prompts_per_step`.

    `tokenizer` is needed for `data.chat_template` and for the `data.max_prompt_tokens` check (skipped
    without one); it may also be assigned later, before the first batch. `seed` fixes the shuffles and the
    arithmetic stream.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self._train_source: Any = None
        self._val_pairs: list[Pair] = []
        self._val_texts: frozenset[str] = frozenset()
        self._val_cache: tuple[Any, list[dict[str, str]], int] | None = None  # (tokenizer, prompts, skipped)
        self._committed = _Position()  # consumed by training: what state_dict() saves
        self._produced = _Position()  # handed out by the stream (ahead by the batch Lightning pre-fetches)
        self._pending: deque[tuple[list[str], _Position]] = deque()  # produced, not yet consumed

    # -- checks and setup ---------------------------------------------------------------------------------

    @staticmethod
    def check_source(cfg: DataConfig) -> None:
        """Raise UserInputError for a bad data source before anything heavy is loaded.

        Checks the settings, then each local file of `data.source` / `data.val_source`: it exists, has a
        supported extension, is not empty, parses (a bad JSONL line is reported with its number), has records,
        and its first record has the prompt and answer keys. Hub names are only checked when loaded.
        """
        PromptDataModule._checked_files(cfg)

    @staticmethod
    def _checked_files(cfg: DataConfig) -> dict[str, list[tuple[str, Any]]]:
        """`check_source`, returning the records it read so that `setup` does not read the files twice."""
        _check_settings(cfg)
        files: dict[str, list[tuple[str, Any]]] = {}
        for key, source in (("data.source", cfg.source), ("data.val_source", cfg.val_source)):
            if source is None or source in files or _classify(source, key) != "file":
                continue
            records = _read_file(Path(source).expanduser(), cfg)
            where, first = records[0]
            _extract(first, where, cfg)
            if key == "data.source" and cfg.val_source is None and len(records) <= cfg.val_size:
                raise UserInputError(
                    f"data.source={source!r} has {len(records)} records and data.val_size={cfg.val_size} holds out "
                    "all of them, leaving none to train on; lower data.val_size (e.g. 0) or set data.val_source"
                )
            files[source] = records
        return files

    def setup(self, stage: str | None = None) -> None:
        """Check and load the sources (once; later calls do nothing)."""
        if self._train_source is not None:
            return
        cfg = self.cfg
        files = self._checked_files(cfg)
        if cfg.chat_template and self.tokenizer is not None and not getattr(self.tokenizer, "chat_template", None):
            raise UserInputError(
                "data.chat_template=true but the tokenizer has no chat template; set data.chat_template=false"
            )
        held_out = cfg.val_size if cfg.val_source is None else 0
        train_source, val_pairs = self._load(cfg.source, "data.source", files, held_out)
        if cfg.val_source is not None and cfg.val_size > 0:
            _, val_pairs = self._load(cfg.val_source, "data.val_source", files, cfg.val_size, validation_only=True)
        self._val_pairs = val_pairs
        self._val_texts = frozenset(text for text, _ in val_pairs)
        self._val_cache = None
        self._train_source = train_source

    def _load(
        self, source: str, key: str, files: dict, held_out: int, validation_only: bool = False
    ) -> tuple[Any, list[Pair]]:
        """(training source, the first `held_out` records as validation pairs) for one configured source."""
        cfg, kind = self.cfg, _classify(source, key)
        if kind == "arithmetic":
            from kpo_lightning.data.arithmetic import validation_problem

            val = [validation_problem(self.seed, i, cfg.arithmetic_max_operand) for i in range(held_out)]
            return _ArithmeticSource(self.seed, cfg.arithmetic_max_operand), [(p["prompt"], p["answer"]) for p in val]
        if kind == "chain":
            from kpo_lightning.data.chain_arithmetic import ChainSource

            chain = ChainSource(self.seed, cfg.chain_min_operands, cfg.chain_max_operands, cfg.chain_curriculum_prompts)
            return chain, chain.validation_pairs(held_out)
        if kind == "file":
            records = files[source]
            if validation_only:
                records = records[:held_out]
            pairs = [_extract(record, where, cfg) for where, record in records]
            return self._split_list(pairs, source, key, held_out, validation_only)
        dataset = _load_hub(source, cfg, key)
        import datasets

        if isinstance(dataset, datasets.IterableDataset):
            head = list(itertools.islice(dataset, held_out if held_out else 1))
            pairs = [_extract(r, f"{source}, record {i + 1}", cfg) for i, r in enumerate(head)]  # key check
            if not head:
                raise UserInputError(f"{key}={source!r}: the dataset split it was loaded from has no records")
            return _StreamSource(dataset, source, cfg, held_out, self.seed), pairs[:held_out]
        if validation_only:
            dataset = dataset.select(range(min(held_out, len(dataset))))
        pairs = [_extract(r, f"{source}, row {i + 1}", cfg) for i, r in enumerate(dataset)]
        return self._split_list(pairs, source, key, held_out, validation_only)

    def _split_list(
        self, pairs: list[Pair], source: str, key: str, held_out: int, validation_only: bool
    ) -> tuple[Any, list[Pair]]:
        if validation_only:
            return None, pairs
        if len(pairs) <= held_out:
            raise UserInputError(
                f"{key}={source!r} has {len(pairs)} records and data.val_size={held_out} holds out all of them, "
                f"leaving none to train on; lower data.val_size (e.g. {len(pairs) // 10}) or set data.val_source"
            )
        return _ListSource(pairs[held_out:], self.seed, self.cfg.shuffle), pairs[:held_out]

    def _require_setup(self) -> None:
        if self._train_source is None:
            self.setup()

    # -- prompt formatting ------------------------------------------------------------------------------

    def format_prompt(self, text: str) -> str:
        """The model input for a record's prompt text: template, then the chat template if enabled (with
        `data.chat_template_kwargs` as extra template variables, e.g. enable_thinking=False for Qwen3).

        Without a chat template a `data.system_prompt` is put in front of the prompt, separated by a blank line.
        """
        cfg = self.cfg
        body = _apply_template(cfg.prompt_template, text)
        if not cfg.chat_template:
            return f"{cfg.system_prompt}\n\n{body}" if cfg.system_prompt else body
        tok = self.tokenizer
        if tok is None:
            raise UserInputError("data.chat_template=true needs the model's tokenizer; set data.chat_template=false")
        if not getattr(tok, "chat_template", None):
            raise UserInputError(
                "data.chat_template=true but the tokenizer has no chat template; set data.chat_template=false"
            )
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": body})
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **dict(cfg.chat_template_kwargs or {})
        )

    def num_prompt_tokens(self, prompt: str) -> int | None:
        """Token count of a formatted prompt, or None without a tokenizer: the tokens the sampler feeds the model
        (`prompt_tokens.encode_prompt`: the tokenizer's special tokens, e.g. BOS, unless the text starts with BOS,
        as chat templates write it)."""
        if self.tokenizer is None:
            return None
        return len(encode_prompt(self.tokenizer, prompt))

    def _too_long(self, prompt: str) -> bool:
        n = self.num_prompt_tokens(prompt)
        return n is not None and n > self.cfg.max_prompt_tokens

    # -- training stream ----------------------------------------------------------------------------------

    def _restart_stream(self) -> None:
        """A new iterator continues from what training consumed; batches produced beyond that are redone."""
        self._produced = replace(self._committed)
        self._pending.clear()

    def _deferring(self) -> bool:
        """True while a Trainer is fitting: consumption is then marked by `on_before_batch_transfer`."""
        trainer = self.trainer
        if trainer is None:
            return False
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        return trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING

    def _next_train_batch(self) -> dict[str, list[str]]:
        """Produce the batch at the produced position and advance it."""
        self._require_setup()
        pos = replace(self._produced)
        prompts, answers = self._fill(pos)
        prompts, answers = self._shard(prompts), self._shard(answers)
        pos.batches += 1
        self._produced = pos
        if self._deferring():
            # Lightning's fetcher holds at most one batch it has not handed over yet, so anything older than the
            # newest pending batch has been consumed even if its hook was never seen (bounds the queue).
            while len(self._pending) > 1:
                self._committed = self._pending.popleft()[1]
            self._pending.append((list(prompts), replace(pos)))
        else:
            self._pending.clear()
            self._committed = replace(pos)
        return {"prompt": prompts, "answer": answers}

    def _shard(self, items: list[str]) -> list[str]:
        """This process's contiguous share of a global batch. Every process reads the same stream (so the
        saved position is the same everywhere) and keeps its own slice: groups are never split across processes."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return items
        if len(items) % world:
            raise UserInputError(
                f"data.prompts_per_step={len(items)} must be a multiple of the {world} processes; change one of them"
            )
        share = len(items) // world
        return items[trainer.global_rank * share : (trainer.global_rank + 1) * share]

    def _fill(self, pos: _Position) -> tuple[list[str], list[str]]:
        """Read records from `pos` (advancing it) until `prompts_per_step` usable prompts are collected."""
        cfg, source = self.cfg, self._train_source
        prompts: list[str] = []
        answers: list[str] = []
        unusable_run = 0  # records in a row that could not be used
        while len(prompts) < cfg.prompts_per_step:
            item = source.read(pos.epoch, pos.index)
            if item is None:  # end of an epoch of a finite source
                if pos.index == 0:
                    raise UserInputError(f"data.source={cfg.source!r}: no training records")
                if unusable_run >= pos.index:
                    self._raise_all_unusable(pos)
                pos.epoch, pos.index = pos.epoch + 1, 0
                continue
            pos.index += 1
            text, answer = item
            if text in self._val_texts:
                pos.skipped_val_overlap += 1
                unusable_run += 1
            else:
                prompt = self.format_prompt(text)
                if self._too_long(prompt):
                    pos.skipped_long += 1
                    unusable_run += 1
                else:
                    prompts.append(prompt)
                    answers.append(answer)
                    unusable_run = 0
            if unusable_run > MAX_CONSECUTIVE_SKIPS:
                self._raise_all_unusable(pos)
        return prompts, answers

    def _raise_all_unusable(self, pos: _Position) -> None:
        raise UserInputError(
            f"data.source={self.cfg.source!r}: no usable training prompt in a whole pass "
            f"({pos.skipped_long} longer than data.max_prompt_tokens={self.cfg.max_prompt_tokens}, "
            f"{pos.skipped_val_overlap} identical to validation prompts); raise data.max_prompt_tokens, shorten "
            f"data.prompt_template / data.system_prompt, or use a different data.val_source"
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hands a batch to a step: if it is the oldest pending training batch, it is now consumed."""
        if self._pending and isinstance(batch, dict) and batch.get("prompt") == self._pending[0][0]:
            self._committed = self._pending.popleft()[1]
        return batch

    def train_dataloader(self) -> DataLoader:
        """Endless batches of `prompts_per_step`; the DataLoader does no batching of its own (batch_size=None)."""
        self._require_setup()
        return DataLoader(_TrainStream(self), batch_size=None, collate_fn=_as_is, num_workers=0)

    def train_batches(self) -> Iterator[dict[str, list[str]]]:
        """The training stream as a plain iterator (each batch counts as consumed when yielded)."""
        return iter(_TrainStream(self))

    @property
    def num_skipped_long(self) -> int:
        """Training prompts skipped so far for exceeding `data.max_prompt_tokens` (part of the saved state)."""
        return self._committed.skipped_long

    @property
    def num_skipped_val_overlap(self) -> int:
        """Training prompts skipped so far because they equal a validation prompt."""
        return self._committed.skipped_val_overlap

    @property
    def num_batches(self) -> int:
        """Training batches consumed so far."""
        return self._committed.batches

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The consumed position of the training stream (Lightning stores it in checkpoints)."""
        return {"format": STATE_FORMAT, "source": self.cfg.source, "seed": self.seed, **asdict(self._committed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream exactly after the saved position (any live iterator follows)."""
        names = [f.name for f in fields(_Position)]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise UserInputError(f"the checkpoint's data state lacks {missing}; it was not saved by PromptDataModule")
        if state_dict.get("source") != self.cfg.source or state_dict.get("seed") != self.seed:
            warnings.warn(
                f"resuming the data stream of source={state_dict.get('source')!r} seed={state_dict.get('seed')!r} "
                f"with source={self.cfg.source!r} seed={self.seed!r}: the position is kept, but the prompts that "
                f"follow are not the ones the interrupted run would have seen",
                stacklevel=2,
            )
        self._committed = _Position(**{n: int(state_dict[n]) for n in names})
        self._restart_stream()

    # -- validation -------------------------------------------------------------------------------------------

    def val_prompts(self) -> list[dict[str, str]]:
        """The validation prompts, formatted, as [{"prompt", "answer"}]; over-long ones are dropped (counted in
        `num_skipped_long_val`). A fixed list: the same every call."""
        self._require_setup()
        if self._val_cache is None or self._val_cache[0] is not self.tokenizer:
            kept, skipped = [], 0
            for text, answer in self._val_pairs:
                prompt = self.format_prompt(text)
                if self._too_long(prompt):
                    skipped += 1
                else:
                    kept.append({"prompt": prompt, "answer": answer})
            self._val_cache = (self.tokenizer, kept, skipped)
        return list(self._val_cache[1])

    def iter_val_prompts(self) -> Iterator[dict[str, str]]:
        """Validation prompts one at a time, `{"prompt": str, "answer": str}` (for evaluation code)."""
        return iter(self.val_prompts())

    def iter_val_batches(
        self, batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[dict[str, list]]:
        """Validation in `{"prompt": [...], "answer": [...]}` chunks of `batch_size` (default prompts_per_step);
        the last chunk may be shorter.

        With `world_size` > 1, process `rank`'s share: the prompts cut into `world_size` contiguous shares of
        ceil(n / world_size), so every process runs the same number of batches of the same sizes (under FSDP each
        `generate` is a collective) and gathered results come back in prompt order. A share that falls short is
        filled with copies of the first prompt, flagged True in the batch's "padding" list (present only then) so
        their results are dropped after gathering.
        """
        size = batch_size or self.cfg.prompts_per_step
        items = self.val_prompts()
        padding = [False] * len(items)
        if world_size > 1 and items:
            share = -(-len(items) // world_size)
            items = items[rank * share : (rank + 1) * share]
            padding = [False] * len(items) + [True] * (share - len(items))
            items = items + [self.val_prompts()[0]] * (share - len(items))
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            batch: dict[str, list] = {"prompt": [r["prompt"] for r in chunk], "answer": [r["answer"] for r in chunk]}
            if world_size > 1:
                batch[VAL_PADDING] = padding[start : start + size]
            yield batch

    @property
    def num_skipped_long_val(self) -> int:
        """Validation prompts dropped for exceeding `data.max_prompt_tokens`."""
        self.val_prompts()
        return self._val_cache[2] if self._val_cache else 0

    def val_dataloader(self) -> DataLoader:
        """This process's share of the validation batches (all of them on one process; empty when data.val_size
        is 0): each process samples its own prompts and the module gathers the results once."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = list(self.iter_val_batches(rank=rank, world_size=world))
        return DataLoader(_BatchList(batches), batch_size=None, collate_fn=_as_is)


__all__ = ["PromptDataModule", "FILE_EXTENSIONS", "STREAM_SHUFFLE_BUFFER", "VAL_PADDING"]
