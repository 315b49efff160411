"""`PromptDataModule`: an endless, resumable stream of prompts for RL, plus a fixed validation list.

Sources (`data.source`, and `data.val_source` when set):

* ``arithmetic``: the built-in seeded task (`kpo_lightning.arithmetic`); validation uses its held-out stream.
* ``chain``: the built-in chained-addition task (`kpo_lightning.chain_arithmetic`), likewise.
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
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kpo_lightning.config import DataConfig
from kpo_lightning.errors import UserInputError
from kpo_lightning.prompt_tokens import encode_prompt

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# Extensions that say "this is meant to be a file", so a missing one is reported as a missing file rather than
# tried as a hub dataset name.
_PATH_LIKE_EXTENSIONS = FILE_EXTENSIONS + (".txt", ".tsv", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".ndjson")
STREAM_SHUFFLE_BUFFER = 10_000  # records in the shuffle buffer of a streamed hub dataset
# apply_chat_template arguments the data module sets itself: data.chat_template_kwargs may not override them.
RESERVED_CHAT_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
                        "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
                        "return_assistant_tokens_mask", "chat_template")
MAX_CONSECUTIVE_SKIPS = 100_000  # endless sources: this many unusable prompts in a row is an input error
STATE_FORMAT = 1

Pair = tuple[str, str]  # (prompt text before formatting, answer)


# ----------------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------------


def _lookup(record: dict, key: str) -> tuple[bool, Any]:
    """`record[key]`, or a walk down a dotted path (`a.b.c`) when the key itself is absent."""
    if key in record:
        return True, record[key]
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return "." in key, value


def _extract(record: Any, where: str, cfg: DataConfig) -> Pair:
    """(prompt text, answer str) from one record; `where` ("data.jsonl, line 3") goes into every error."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected a record (an object with fields), got {type(record).__name__}")
    keys = _layout_keys(record, cfg)
    values = []
    for config_key, key in (("data.prompt_key", keys[0]), ("data.answer_key", keys[1])):
        found, value = _lookup(record, key)
        if not found:
            raise UserInputError(
                f"{where}: the record has no field {key!r} ({config_key}); its keys are {sorted(map(str, record))}. "
                f"Set {config_key} to the field that holds it"
            )
        if value is None:
            raise UserInputError(f"{where}: field {key!r} ({config_key}) is empty (null)")
        values.append(value)
    prompt, answer = values
    if isinstance(prompt, list):  # chat messages: use the last user turn
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise UserInputError(
                f"{where}: field {cfg.prompt_key!r} is a list but not chat messages with a user turn "
                f"([{{'role': 'user', 'content': ...}}]); point data.prompt_key at a text field"
            )
        prompt = users[-1]
    if not isinstance(prompt, str):
        raise UserInputError(
            f"{where}: field {cfg.prompt_key!r} (data.prompt_key) is a {type(prompt).__name__}, not text"
        )
    return prompt, _clean_answer(str(answer))


# Common math benchmark layouts, used when the configured prompt/answer fields are absent from a record:
# MATH-500 / AIME (problem, answer), AIME 2024 dumps (Problem, Answer), GSM8K (question, answer with "#### 42").
KNOWN_LAYOUTS = (("problem", "answer"), ("Problem", "Answer"), ("question", "answer"))


def _layout_keys(record: dict, cfg: DataConfig) -> tuple[str, str]:
    """The configured (prompt, answer) fields when the record has them, else the first known layout it has."""
    if _lookup(record, cfg.prompt_key)[0] and _lookup(record, cfg.answer_key)[0]:
        return cfg.prompt_key, cfg.answer_key
    for prompt_key, answer_key in KNOWN_LAYOUTS:
        if prompt_key in record and answer_key in record:
            return prompt_key, answer_key
    return cfg.prompt_key, cfg.answer_key  # reported as missing by the caller


def _clean_answer(answer: str) -> str:
    """GSM8K answers end with "#### 1,234": keep the final number only (commas dropped)."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer


def _parse_jsonl(text: str, path: Path) -> list[tuple[str, Any]]:
    """One JSON object per non-blank line; a bad line is reported with its number."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(
                f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); each line of a JSON Lines "
                f"file must be one complete JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise UserInputError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append((f"{path}, line {lineno}", obj))
    return records


def _parse_json(text: str, path: Path) -> list[tuple[str, Any]]:
    """A list of records, {"some_key": [records]}, or columns {"prompt": [...], "answer": [...]}.

    A .json file that is really JSON Lines (a common mix-up) is read as JSON Lines.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _parse_jsonl(text, path)
        raise UserInputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]  # {"data": [records]}
        elif len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            keys = list(data)
            data = [dict(zip(keys, row)) for row in zip(*lists)]  # columns
        else:
            raise UserInputError(
                f"{path}: expected a list of records ([{{...}}, ...]) or columns ({{'prompt': [...], ...}}), "
                f"got an object with keys {sorted(data)[:10]}"
            )
    if not isinstance(data, list):
        raise UserInputError(f"{path}: expected a list of records, got a JSON {type(data).__name__}")
    return [(f"{path}, record {i + 1}", r) for i, r in enumerate(data)]


def _parse_csv(text: str, path: Path) -> list[tuple[str, Any]]:
    """Rows of a CSV file with a header line; values stay exactly as written (no number parsing)."""
    reader = csv.DictReader(text.splitlines())
    records = []
    try:
        for row in reader:
            row = {k: v for k, v in row.items() if k is not None}  # drop overflow cells of a too-long row
            records.append((f"{path}, line {reader.line_num}", row))
    except csv.Error as e:
        raise UserInputError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    return records


def _read_parquet(path: Path, cfg: DataConfig) -> list[tuple[str, Any]]:
    """Rows of a parquet file, reading only the columns the prompt and answer keys need."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        keys = (cfg.prompt_key, cfg.answer_key)
        wanted = set(keys) | {k.split(".")[0] for k in keys}  # a dotted key needs its top-level column
        for config_key, key in (("data.prompt_key", cfg.prompt_key), ("data.answer_key", cfg.answer_key)):
            if key not in names and key.split(".")[0] not in names:
                raise UserInputError(
                    f"{path}, row 1: the record has no field {key!r} ({config_key}); its keys are {sorted(names)}. "
                    f"Set {config_key} to the column that holds it"
                )
        columns = [n for n in names if n in wanted]
        rows = pq.read_table(path, columns=columns).to_pylist()
    except UserInputError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise UserInputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return [(f"{path}, row {i + 1}", r) for i, r in enumerate(rows)]


def _read_file(path: Path, cfg: DataConfig) -> list[tuple[str, Any]]:
    """All records of a local file as (where, record), with the file-level checks (empty, malformed, none)."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: the file is empty; it needs one record per prompt")
    if suffix == ".parquet":
        records = _read_parquet(path, cfg)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        if not text.strip():
            raise UserInputError(f"{path}: the file is empty (only whitespace); it needs one record per prompt")
        parse = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[suffix]
        records = parse(text, path)
    if not records:
        raise UserInputError(f"{path}: the file has no records")
    return records


def _classify(source: str, key: str) -> str:
    """'arithmetic', 'chain', 'file', 'dir' (a local dataset folder) or 'hub'; raises for a missing or unsupported file."""
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


def _load_hub(name: str, cfg: DataConfig, key: str) -> Any:
    """`datasets.load_dataset(...)`, any failure turned into a UserInputError that suggests a local file."""
    import datasets

    prefix = "data.val_" if key == "data.val_source" else "data."
    subset, split = (cfg.val_subset, cfg.val_split) if key == "data.val_source" else (cfg.subset, cfg.split)
    try:
        return datasets.load_dataset(name, subset, split=split, streaming=cfg.streaming)
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserInputError(
            f"{key}={name!r}: could not load it as a Hugging Face dataset ({prefix}subset={subset!r}, "
            f"{prefix}split={split!r}): {type(e).__name__}: {detail}. Check the name, subset and split and "
            f"your network, or point {key} at a local .jsonl/.json/.parquet/.csv file"
        ) from None


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


def _check_chat_template_kwargs(kwargs: Any) -> None:
    """data.chat_template_kwargs: a mapping of template variable names (not the arguments we set ourselves)."""
    if not isinstance(kwargs, dict):
        raise UserInputError(
            f"data.chat_template_kwargs={kwargs!r} is invalid: give a mapping, e.g. {{enable_thinking: false}}"
        )
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise UserInputError(
                f"data.chat_template_kwargs has the key {key!r}: keys are chat template variable names "
                "(identifiers such as enable_thinking)"
            )
        if key in RESERVED_CHAT_KWARGS:
            raise UserInputError(
                f"data.chat_template_kwargs.{key} is set by the data module itself (prompts are templated as text "
                f"with add_generation_prompt=true); remove it"
            )


def _apply_template(template: str, text: str) -> str:
    """`template.format(prompt=text)`, with a fixable message for stray braces or a missing {prompt}."""
    try:
        out = template.format(prompt=text)
    except (KeyError, IndexError, ValueError) as e:
        raise UserInputError(
            f"data.prompt_template={template!r} cannot be formatted ({type(e).__name__}: {e}): it may use only "
            f"{{prompt}}; write literal braces as {{{{ and }}}} (e.g. \\boxed{{{{}}}})"
        ) from None
    return out


# ----------------------------------------------------------------------------------------------------------
# Training record sources: read(epoch, index) -> (text, answer), or None when the epoch is over
# ----------------------------------------------------------------------------------------------------------


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    """A generator seeded by (seed, epoch), stable across processes and Python versions."""
    return random.Random(f"kpo-data/{seed}/{epoch}")


class _ListSource:
    """Finite in-memory records, each epoch a fresh seeded permutation (or file order)."""

    def __init__(self, pairs: list[Pair], seed: int, shuffle: bool) -> None:
        self.pairs, self.seed, self.shuffle = pairs, seed, shuffle
        self._order: tuple[int, list[int]] = (-1, [])

    def read(self, epoch: int, index: int) -> Optional[Pair]:
        if index >= len(self.pairs):
            return None
        if not self.shuffle:
            return self.pairs[index]
        if self._order[0] != epoch:
            order = list(range(len(self.pairs)))
            _epoch_rng(self.seed, epoch).shuffle(order)
            self._order = (epoch, order)
        return self.pairs[self._order[1][index]]


class _ArithmeticSource:
    """The endless built-in task (training side of its train/val partition); one epoch that never ends."""

    def __init__(self, seed: int, max_operand: int) -> None:
        self.seed, self.max_operand = seed, max_operand

    def read(self, epoch: int, index: int) -> Optional[Pair]:
        from kpo_lightning.arithmetic import arithmetic_problem

        p = arithmetic_problem(self.seed, index, self.max_operand, split="train")
        return p["prompt"], p["answer"]


def _buffer_shuffle(items: Iterable, rng: random.Random, size: int) -> Iterator:
    """Approximate shuffle of a stream through a buffer of `size` items (as `datasets` does), deterministic."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class _StreamSource:
    """A streamed dataset: sequential reads are cheap, a jump re-reads the epoch from its start."""

    def __init__(self, dataset: Iterable, name: str, cfg: DataConfig, skip_first: int, seed: int) -> None:
        self.dataset, self.name, self.cfg = dataset, name, cfg
        self.skip_first, self.seed = skip_first, seed
        self._iter: Optional[Iterator] = None
        self._at: Optional[tuple[int, int]] = None  # the (epoch, index) `_iter` will yield next

    def _open(self, epoch: int) -> Iterator:
        items: Iterator = itertools.islice(enumerate(self.dataset), self.skip_first, None)
        if self.cfg.shuffle:
            items = _buffer_shuffle(items, _epoch_rng(self.seed, epoch), STREAM_SHUFFLE_BUFFER)
        return items

    def read(self, epoch: int, index: int) -> Optional[Pair]:
        if self._at != (epoch, index):
            self._iter = itertools.islice(self._open(epoch), index, None)
        assert self._iter is not None
        try:
            number, record = next(self._iter)
        except StopIteration:
            self._at = None
            return None
        self._at = (epoch, index + 1)
        return _extract(record, f"{self.name}, record {number + 1}", self.cfg)


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

    def __init__(self, dm: "PromptDataModule") -> None:
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
        self._val_cache: Optional[tuple[Any, list[dict[str, str]], int]] = None  # (tokenizer, prompts, skipped)
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

    def setup(self, stage: Optional[str] = None) -> None:
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
            from kpo_lightning.arithmetic import validation_problem

            val = [validation_problem(self.seed, i, cfg.arithmetic_max_operand) for i in range(held_out)]
            return _ArithmeticSource(self.seed, cfg.arithmetic_max_operand), [(p["prompt"], p["answer"]) for p in val]
        if kind == "chain":
            from kpo_lightning.chain_arithmetic import ChainSource

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
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       **dict(cfg.chat_template_kwargs or {}))

    def num_prompt_tokens(self, prompt: str) -> Optional[int]:
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

    def iter_val_batches(self, batch_size: Optional[int] = None) -> Iterator[dict[str, list[str]]]:
        """Validation in `{"prompt": [...], "answer": [...]}` chunks of `batch_size` (default prompts_per_step);
        the last chunk may be shorter."""
        size = batch_size or self.cfg.prompts_per_step
        items = self.val_prompts()
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield {"prompt": [r["prompt"] for r in chunk], "answer": [r["answer"] for r in chunk]}

    @property
    def num_skipped_long_val(self) -> int:
        """Validation prompts dropped for exceeding `data.max_prompt_tokens`."""
        self.val_prompts()
        return self._val_cache[2] if self._val_cache else 0

    def val_dataloader(self) -> DataLoader:
        """The validation batches (empty when data.val_size is 0)."""
        return DataLoader(_BatchList(list(self.iter_val_batches())), batch_size=None, collate_fn=_as_is)


__all__ = ["PromptDataModule", "FILE_EXTENSIONS", "STREAM_SHUFFLE_BUFFER"]
