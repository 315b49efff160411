"""The math-verify comparison of the built-in math reward, run in one persistent, killable child process.

math-verify bounds its own work with `signal.alarm`, which only works in the main thread of the main interpreter,
and a signal cannot interrupt a long C call anyway (a CPython big-integer power like 9^(9^9) runs to the end before
any Python signal handler). So its own timeouts are turned off and the comparison runs in one child process
(`workers.start_child`, started lazily on first use, reused across calls). The caller waits for the one-byte
answer up to `timeout_s` (`workers.wait_readable`: SIGTERM and Ctrl-C still stop the wait); on timeout the
child is SIGKILLed, the caller gets None, and a replacement is started at once so that its imports overlap with the
caller's next work. This behaves identically in the main thread and in any other thread, and caps the child's
address space so that a runaway answer cannot take the machine's memory. Calls from several threads share the
child under a lock, so concurrent calls queue.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable

from kpo_lightning.rewards.workers import (
    START_TIMEOUT_S,
    child_setup,
    kill_child,
    read_exact,
    start_child,
    wait_readable,
)

_MEMORY_BYTES = 4 << 30  # address-space cap of the child


def _equal(parse: Callable, verify: Callable, cfg: list, gold_cache: dict, gold: str, pred: str) -> bool:
    """math-verify comparison, run inside the child, timeouts disabled (the parent kills us)."""
    g = gold_cache.get(gold)
    if g is None:
        g = parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=None)
        if len(gold_cache) > 1024:
            gold_cache.clear()
        gold_cache[gold] = g
    p = parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def worker_main() -> None:
    """Entry point of the child: length-prefixed JSON [gold, pred] in, b'1'/b'0' out."""
    out_fd = child_setup(_MEMORY_BYTES)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" and per-item warnings
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_cache: dict = {}
    _equal(parse, verify, cfg, gold_cache, "\\frac{1}{2}", "0.5")  # warm up sympy's lazy imports
    gold_cache.clear()
    os.write(out_fd, b"R")
    while True:
        head = read_exact(0, 4)
        if head is None:
            return
        body = read_exact(0, struct.unpack("<I", head)[0])
        if body is None:
            return
        try:
            gold, pred = json.loads(body)
            ok = _equal(parse, verify, cfg, gold_cache, gold, pred)
        except BaseException:  # noqa: BLE001 - RecursionError, MemoryError, sympy internals: all "not equal"
            ok = False
        os.write(out_fd, b"1" if ok else b"0")


class MathVerifyWorker:
    """One lazily started math-verify child, killed and replaced on timeout or crash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc = None
        self.ready = False
        self.pid = os.getpid()

    def _spawn(self) -> None:
        self.proc = start_child("kpo_lightning.rewards.math_verify_worker.worker_main")
        self.ready = False

    def _kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, False
        kill_child(proc)

    def _ensure_ready(self) -> None:
        if self.pid != os.getpid():  # forked child: the handle belongs to the parent; leave it alone
            self.proc, self.ready, self.pid = None, False, os.getpid()
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self.ready:
            fd = self.proc.stdout.fileno()
            ok = wait_readable([fd], time.monotonic() + START_TIMEOUT_S)
            if not ok or os.read(fd, 1) != b"R":
                self._kill()
                raise RuntimeError(
                    "the math-verify worker process did not start; check that `python -c "
                    '"import math_verify"` works (pip install math-verify)'
                )
            self.ready = True

    def equal(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """math-verify equivalence; None when it took longer than timeout_s (the child is then replaced).

        A child that dies on an answer (a C stack overflow, the memory cap) gives False and is restarted on the
        next call."""
        with self.lock:
            self._ensure_ready()
            body = json.dumps([gold, pred]).encode()
            deadline = time.monotonic() + timeout_s
            fd = self.proc.stdout.fileno()
            try:
                self.proc.stdin.write(struct.pack("<I", len(body)) + body)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return None
            try:
                answered = wait_readable([fd], deadline)
            except BaseException:  # SIGTERM / Ctrl-C: its answer would be read as the next call's
                self._kill()
                raise
            if not answered:
                self._kill()
                self._spawn()  # start the replacement now; its imports overlap with the caller's work
                return None
            ans = os.read(fd, 1)
            if ans not in (b"0", b"1"):  # EOF: the child crashed (e.g. C stack overflow on this input): not equal
                self._kill()
                return False
            return ans == b"1"

    def close(self) -> None:
        if self.pid == os.getpid():
            self._kill()


WORKER = MathVerifyWorker()
atexit.register(WORKER.close)
