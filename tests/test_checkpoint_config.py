"""Checkpoint keys out of range are refused with one line (exit 2): `checkpoint.keep_last=0` would keep every
checkpoint (RolloutCheckpoint prunes `[:-keep_last]`, which is nothing for 0), a negative interval is meaningless.
The smallest accepted values are written out here, not read from the checks' table."""

from __future__ import annotations

import pytest

from kpo_lightning.cli.main import main


@pytest.mark.parametrize(
    "override, needle",
    [
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1"),
        ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps=-1"),
    ],
)
def test_out_of_range_checkpoint_keys_are_one_line_errors(capsys, override, needle):
    assert main([override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err and ">= " in err, err


@pytest.mark.parametrize("override", ["checkpoint.keep_last=1", "checkpoint.every_n_steps=0"])
def test_smallest_valid_checkpoint_values_are_accepted(capsys, override):
    assert main([override, "--print-config"]) == 0
    assert override.split("=")[0].split(".")[1] in capsys.readouterr().out
