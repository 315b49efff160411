"""Training record sources of `PromptDataModule`: `read(epoch, index) -> (text, answer)`, or None when the epoch is
over.

A source is a pure function of (seed, epoch, index), so the data stream resumes exactly from a saved position:
finite lists are shuffled per epoch by a generator seeded from (seed, epoch), the built-in arithmetic task is one
endless epoch, streamed hub datasets are re-read from the start of the epoch on a jump. Which source a configured
`data.source` selects is decided in `datamodule.py` (`_classify`, `PromptDataModule._load`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator

from kpo_lightning.config import DataConfig
from kpo_lightning.data.records import Pair, _extract

STREAM_SHUFFLE_BUFFER = 10_000  # records in the shuffle buffer of a streamed hub dataset


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    """A generator seeded by (seed, epoch), stable across processes and Python versions."""
    return random.Random(f"kpo-data/{seed}/{epoch}")


class _ListSource:
    """Finite in-memory records, each epoch a fresh seeded permutation (or file order)."""

    def __init__(self, pairs: list[Pair], seed: int, shuffle: bool) -> None:
        self.pairs, self.seed, self.shuffle = pairs, seed, shuffle
        self._order: tuple[int, list[int]] = (-1, [])

    def read(self, epoch: int, index: int) -> Pair | None:
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

    def read(self, epoch: int, index: int) -> Pair | None:
        from kpo_lightning.data.arithmetic import arithmetic_problem

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
        self._iter: Iterator | None = None
        self._at: tuple[int, int] | None = None  # the (epoch, index) `_iter` will yield next

    def _open(self, epoch: int) -> Iterator:
        items: Iterator = itertools.islice(enumerate(self.dataset), self.skip_first, None)
        if self.cfg.shuffle:
            items = _buffer_shuffle(items, _epoch_rng(self.seed, epoch), STREAM_SHUFFLE_BUFFER)
        return items

    def read(self, epoch: int, index: int) -> Pair | None:
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
