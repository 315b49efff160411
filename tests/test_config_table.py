"""The config reference (docs/configuration.md) lists every key of the typed schema (kpo_lightning/config.py).

The table is what users read; the dataclasses are what runs. A key added to a dataclass without a table row, a
row left behind after a key is removed, or a default changed on one side only fails here. Defaults in the table
are Python literals in backticks (`0`, `1e-6`, `"auto"`, `None`, `True`, `{}`, `(0.9, 0.999)`), compared by value
and type.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from kpo_lightning.config import Config

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ROW = re.compile(r"^\| `([a-z_][a-z0-9_.]*)` \| `([^`]*)` \| .+\|\s*$")


def schema_defaults(obj, prefix: str = "") -> dict[str, object]:
    """Every leaf key of a config dataclass instance (dotted) and its default value."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(schema_defaults(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def config_table() -> dict[str, str]:
    """Rows of the table under '## Config reference': key -> default as written."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert "\n## Config reference\n" in text, f"{CONFIG_DOC} has no '## Config reference' heading"
    section = text.split("\n## Config reference\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"the config table lists {m.group(1)} twice"
            rows[m.group(1)] = m.group(2)
    return rows


def test_config_table_has_every_key_and_no_other():
    schema, table = schema_defaults(Config()), config_table()
    assert len(schema) > 60  # the schema walk found the nested sections (80 keys today)
    assert sorted(set(schema) - set(table)) == [], "keys missing from the config table in docs/configuration.md"
    assert sorted(set(table) - set(schema)) == [], (
        "the config table in docs/configuration.md lists keys the schema does not have"
    )


def test_config_table_defaults_equal_the_dataclass_defaults():
    schema, table = schema_defaults(Config()), config_table()
    wrong = {}
    for key, written in table.items():
        if key not in schema:
            continue
        value = ast.literal_eval(written)
        expected = schema[key]
        if value != expected or type(value) is not type(expected):
            wrong[key] = (written, repr(expected))
    assert wrong == {}, "config table default (written, dataclass repr) differs"
