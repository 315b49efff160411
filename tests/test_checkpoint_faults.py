"""Faults around checkpoints: damaged files refused with one line, a full disk during a save, keep_last.

Resuming from the intact checkpoint beside a damaged one (and ending like an uninterrupted run) is in
test_resume.py, next to the reference run it is compared with.
"""

import errno
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args, write_tiny_run_inputs

from kpo_lightning.cli.main import main
from kpo_lightning.training import checkpointing
from kpo_lightning.training.checkpointing import checkpoint_problem, list_checkpoints


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run_inputs(tmp_path_factory.mktemp("faults"))


args = tiny_run_args


def fake_checkpoint(step: int) -> dict:
    return {
        "state_dict": {"w": torch.zeros(2)},
        "optimizer_states": [],
        "lr_schedulers": [],
        "loops": {},
        "kpo": {"rollout_step": step},
    }


def test_checkpoint_problem_names_each_fault(tmp_path):
    good = tmp_path / "step-000004.ckpt"
    torch.save(fake_checkpoint(4), good)
    assert checkpoint_problem(good) is None

    cases = {
        "missing.ckpt": (None, "does not exist"),
        "step-000001.ckpt": (b"", "empty file (0 bytes)"),
        "step-000002.ckpt": (good.read_bytes()[:200], "cannot be read, truncated or not a checkpoint"),
        "step-000003.ckpt": (b"not a zip at all" * 10, "cannot be read"),
    }
    for name, (content, expected) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        assert checkpoint_problem(tmp_path / name).startswith(expected), name

    torch.save([1, 2], tmp_path / "list.ckpt")
    assert checkpoint_problem(tmp_path / "list.ckpt") == "holds a list, not a training checkpoint"
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    assert "missing optimizer_states, lr_schedulers, loops, kpo" in checkpoint_problem(tmp_path / "weights.ckpt")
    torch.save(fake_checkpoint(3), tmp_path / "step-000005.ckpt")
    assert checkpoint_problem(tmp_path / "step-000005.ckpt") == "its name says step 5 but it holds step 3"

    sharded = tmp_path / "step-000006.ckpt"  # a folder, as sharded strategies write: Lightning checks its content
    sharded.mkdir()
    assert checkpoint_problem(sharded) == "empty folder"
    (sharded / "shard-0.distcp").write_bytes(b"x")
    assert checkpoint_problem(sharded) is None


def test_all_checkpoints_damaged_stops_with_one_line_or_starts_fresh_if_asked(setup, capsys):
    out = setup / "all-damaged"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step-000002.ckpt").write_bytes(b"")
    (ckpts / "step-000004.ckpt").write_bytes(b"PK\x03\x04 cut short")

    assert main(args(setup, out, "trainer.max_steps=1", "resume=auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"resume=auto: no intact checkpoint in {ckpts}" in err
    assert "step-000004.ckpt: cannot be read" in err and "step-000002.ckpt: empty file" in err
    assert "resume=auto_or_fresh" in err  # the fix is named
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002.ckpt", "step-000004.ckpt"]  # untouched
    assert not (out / "config.yaml").exists()  # nothing written

    assert main(args(setup, out, "trainer.max_steps=1", "resume=auto_or_fresh")) == 0
    printed = capsys.readouterr().out
    assert "skipped step-000004.ckpt" in printed and "starting fresh" in printed
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-000001.ckpt",
        "step-000002.ckpt.damaged",
        "step-000004.ckpt.damaged",
    ]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["zero-byte", "truncated"])
def test_resume_path_to_damaged_file_is_one_line(setup, capsys, content):
    bad = setup / "bad.ckpt"
    bad.write_bytes(content)
    assert main(args(setup, setup / "unused", f"resume={bad}")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: resume={bad}: ")
    assert ("empty file" if not content else "cannot be read, truncated or not a checkpoint") in err
    assert main(args(setup, setup / "unused", f"resume={bad}", "debug=true")) == 2
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_during_save_keeps_older_checkpoint_and_leaves_no_tmp(setup, capsys, monkeypatch):
    """The second save fails half-written with ENOSPC (the writer patched): one line naming the folder, the free
    space and the size needed; exit 1; no .tmp left; step 1 byte-for-byte intact."""
    write = checkpointing._write_file
    written = []

    def enospc_on_second_save(checkpoint, path):
        if written:
            Path(path).write_bytes(b"\0" * 4096)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(checkpoint, path)
        written.append(Path(path).read_bytes())

    monkeypatch.setattr(checkpointing, "_write_file", enospc_on_second_save)
    out = setup / "full-disk"
    ckpts = out / "checkpoints"
    assert main(args(setup, out, "trainer.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=5")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: could not save checkpoint step-000002.ckpt in {ckpts}: No space left on device")
    assert "free there: " in line and "a checkpoint needs about " in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001.ckpt"]  # no .tmp, no step 2
    assert (ckpts / "step-000001.ckpt").read_bytes() == written[0]
    assert not (out / "final").exists()


def test_too_little_free_space_is_found_before_writing(setup, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = setup / "no-room"
    assert main(args(setup, out, "trainer.max_steps=1", "debug=true")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err  # debug=true shows where
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: could not save checkpoint step-000001.ckpt in {out / 'checkpoints'}: "
        "not enough free space (free there: 1.0 kB, a checkpoint needs about "
    )
    assert list((out / "checkpoints").iterdir()) == []


def test_keep_last_keeps_exactly_that_many_and_clears_stale_tmp(setup):
    out = setup / "keep"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000009.ckpt.tmp").write_bytes(b"left by a kill mid-save")
    assert main(args(setup, out, "trainer.max_steps=5", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004.ckpt", "step-000005.ckpt"]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(out / "checkpoints"))
