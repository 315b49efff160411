"""Reading training/validation records: local files of every supported format and hub datasets, and turning one
record into a (prompt text, answer) pair.

Files: ``.jsonl`` (one object a line), ``.json`` (a list of records, ``{"key": [records]}`` or columns), ``.csv``
(a header line; values stay text) and ``.parquet`` (only the needed columns are read). A record's prompt and answer
come from `data.prompt_key` / `data.answer_key` (dotted paths reach into nested records; a list of chat messages
gives its last user turn), or from a known benchmark layout when those fields are absent. Every problem is a
`UserInputError` naming the file and line/record.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kpo_lightning.config import DataConfig
from kpo_lightning.errors import UserInputError

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")

Pair = tuple[str, str]  # (prompt text before formatting, answer)


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
