"""Reward work in child processes: time bounds that always hold, and a stop on SIGTERM/Ctrl-C that is never blocked.

A reward function can block (a stuck sandbox, an HTTP judge that never answers, a huge symbolic computation), and a
Python thread cannot be interrupted from outside. So rewards that need a time bound run in plain child processes
(`subprocess`, running a `-c` entry point of this package): the parent waits for an answer with `select` up to
`timeout_s`, and on timeout SIGKILLs the child (which always works, whatever it is doing) and starts a replacement.

Why plain subprocesses and not `multiprocessing`: 'fork' copies a process whose torch/tokenizer threads may hold
locks (unsafe); 'spawn' and 'forkserver' re-import the user's `__main__` script. A child started with
`python -c "from kpo_lightning.rewards.workers import ..."` imports only this package and the reward itself, by name
(`package.module:function` or `path/to/file.py:function`), with the parent's `sys.path` and working directory.

Waiting is interruptible: `wait_readable` wakes every 0.1 s; while scores are computed in the main thread
(`stop_on_sigterm`) a SIGTERM runs the handler that was installed (Lightning's, which marks the trainer as
terminated) and then makes the wait raise Lightning's `SIGTERMException`, exactly what Lightning itself raises for
a SIGTERM between steps (`SystemExit(143)` outside Lightning); Ctrl-C raises `KeyboardInterrupt` out of `select` as
usual.

No process outlives the run. Each child leads its own process group (`start_new_session`), and killing a child
kills its group (`os.killpg`), so a reward's own children (a sandbox, a solver) die with it: on timeout, on
replacement and at exit. Children ignore SIGINT. When the trainer dies without cleaning up (SIGKILL, a crash):
on Linux the kernel SIGKILLs the child (`prctl(PR_SET_PDEATHSIG)`, set only by children started from the main
thread, as the signal follows the thread that started them), even inside a long C call that holds the GIL; a
forked guard process in the child's group waits for the trainer's end of the request pipe to close and then kills
the whole group (the reward's own children included, on any POSIX system); and a watcher thread exits a child whose
parent changed (the portable fallback). User reward children run under an address-space cap
(`reward.worker_memory_mb`, RLIMIT_AS) as math-verify's does; a child that runs out of memory exits, is replaced
by a fresh one and its sample is retried once, so a leaking reward stays bounded.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

START_TIMEOUT_S = 120.0  # a child's imports on a busy machine; not counted in timeout_s
_POLL_S = 0.1  # how often a wait checks for SIGTERM
_STOP = threading.Event()  # set by the SIGTERM handler installed by `stop_on_sigterm`
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
OUT_OF_MEMORY_EXIT = 75  # exit code of a reward child that hit its memory cap (it is then replaced)


# ------------------------------------------------------------------------------------------- outcomes


class Failure(NamedTuple):
    """A sample whose reward could not be computed; it scores 0.0 and is counted."""

    kind: str  # "raised ValueError", "returned None", "timed out", ...
    message: str
    timeout: bool = False


def timeout_failure(timeout_s: float) -> Failure:
    return Failure("timed out", f"no result within reward.timeout_s={timeout_s:g}s", timeout=True)


Outcome = float | Failure


def classify(value: Any) -> Outcome:
    """A reward function's return value as a finite float, or the Failure that explains why it is not one."""
    if value is None:
        return Failure("returned None", "None")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return Failure("returned a non-number", f"{type(value).__name__}: {value!r:.200}")
    try:
        v = float(value)
    except Exception as e:  # noqa: BLE001 - e.g. a multi-element tensor
        return Failure("returned a non-number", f"{type(value).__name__}: {e}")
    if not math.isfinite(v):
        return Failure("returned NaN/inf", repr(v))
    return v


def call_reward(fn, prompt: str, completion: str, answer: str) -> Outcome:
    """One reward call, with every failure of the user's function turned into a Failure."""
    try:
        value = fn(prompt=prompt, completion=completion, answer=answer)
    except Exception as e:  # noqa: BLE001 - a user function may raise anything
        return Failure(f"raised {type(e).__name__}", str(e)[:500])
    return classify(value)


# ------------------------------------------------------------------------------------ interruptible waits


def _sigterm_exception() -> BaseException:
    """Lightning's SIGTERMException when Lightning runs (it then ends the run as for a SIGTERM between steps),
    else SystemExit(143), the shell's code for a SIGTERM (never imports Lightning: that can take seconds)."""
    lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning_exceptions is not None:
        return lightning_exceptions.SIGTERMException()
    return SystemExit(128 + signal.SIGTERM)


def check_stop() -> None:
    """Raise Lightning's SIGTERMException if a SIGTERM arrived while scoring."""
    if _STOP.is_set():
        print("[kpo] SIGTERM while waiting for rewards: stopping the reward processes", flush=True)
        raise _sigterm_exception()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs in the main thread, a SIGTERM also stops reward waits (see the module docstring).

    The installed handler is called first (Lightning's sets `trainer.received_sigterm`). With no Python handler
    installed (SIG_DFL) nothing changes: the default action ends the process at once anyway.
    """
    prev = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(prev):
        yield
        return

    def handler(signum, frame):
        _STOP.set()
        prev(signum, frame)

    _STOP.clear()
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, prev)
        _STOP.clear()


def wait_readable(fds: list[int], deadline: float) -> list[int]:
    """The fds readable (data or EOF) before `deadline` (monotonic), [] when it passes; raises on SIGTERM."""
    while True:
        check_stop()
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        r, _, _ = select.select(fds, [], [], min(left, _POLL_S))
        if r:
            check_stop()
            return r


# ------------------------------------------------------------------------------------------- processes


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly n bytes from a blocking fd; None on EOF."""
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def send_frame(fd: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    view = memoryview(struct.pack("<I", len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def recv_frame(fd: int) -> Any:
    """One length-prefixed JSON message; None on EOF."""
    head = read_exact(fd, 4)
    if head is None:
        return None
    body = read_exact(fd, struct.unpack("<I", head)[0])
    return None if body is None else json.loads(body)


def start_child(entry: str, *args: str) -> subprocess.Popen:
    """`python -c "from kpo_lightning.<module> import <entry>; <entry>()" args...` with this process's sys.path,
    in a process group of its own (see the module docstring)."""
    module, func = entry.rsplit(".", 1)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above kpo_lightning/
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["KPO_PARENT_SYS_PATH"] = json.dumps([p for p in sys.path if p])
    env["KPO_PARENT_PID"] = str(os.getpid())
    # the parent-death signal fires when the starting *thread* ends: only a main-thread start can use it
    env["KPO_PARENT_DEATH_SIGNAL"] = "1" if threading.current_thread() is threading.main_thread() else "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen(
        [sys.executable, "-c", f"from {module} import {func}; {func}()", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        close_fds=True,
        start_new_session=True,
    )


def kill_child(proc: subprocess.Popen | None) -> None:
    """SIGKILL the child's whole process group (its own children too), then reap it."""
    if proc is None:
        return
    try:  # also when the child itself was reaped already: what it started may still run in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # the group is gone already
        pass
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


def _set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when the thread that started it ends, whatever it is doing."""
    if not sys.platform.startswith("linux") or os.environ.get("KPO_PARENT_DEATH_SIGNAL") != "1":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: the guard and the watcher still cover it
        pass


def _start_group_guard() -> None:
    """Fork a guard that waits for the parent's end of our stdin pipe to close (the parent is gone), then SIGKILLs
    our whole group: this process and whatever the reward started. Killing the group on purpose kills it too."""
    if not hasattr(select, "poll") or not hasattr(os, "fork") or os.getpgrp() != os.getpid():
        return  # never kill a group that is not our own (a child started outside `start_child`)
    if os.fork() != 0:
        return
    try:  # the guard: keep only stdin (to see the hang-up) and stderr; holding stdout would hide our death
        os.dup2(2, 1)
        os.closerange(3, 1 << 16)
        poller = select.poll()
        poller.register(0, 0)  # no events asked for: poll returns on POLLHUP/POLLERR only, reads nothing
        while not poller.poll():
            pass
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def child_setup(memory_bytes: int = 0) -> int:
    """Common start of a child process; returns the fd to answer on (stdout, which library prints never reach).

    `memory_bytes` > 0 caps the address space (RLIMIT_AS): an allocation over it raises MemoryError."""
    _set_parent_death_signal()
    parent = int(os.environ.get("KPO_PARENT_PID", os.getppid()))
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; the parent kills us
    _start_group_guard()
    if memory_bytes > 0:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        except (ImportError, ValueError, OSError):
            pass
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed by libraries or the reward goes to stderr, never into the protocol
    for p in reversed(json.loads(os.environ.get("KPO_PARENT_SYS_PATH", "[]"))):
        if p not in sys.path:
            sys.path.insert(1, p)

    def watch_parent() -> None:  # the portable fallback: leave when the parent is gone
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    return out_fd


# ------------------------------------------------------------------------------------ user reward pool


def reward_worker_main() -> None:
    """Entry point of a user-reward child: loads `sys.argv[1]` under the memory cap `sys.argv[2]` (bytes, 0: none),
    answers [prompt, completion, answer] requests; exits with OUT_OF_MEMORY_EXIT when the cap is hit."""
    out_fd = child_setup(int(sys.argv[2]))
    try:
        from kpo_lightning.rewards.user_function import load_user_function

        fn = load_user_function(sys.argv[1])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        send_frame(out_fd, ["error", f"{type(e).__name__}: {e}"])
        return
    send_frame(out_fd, ["ready"])
    try:
        while True:
            req = recv_frame(0)
            if req is None:
                return
            out = call_reward(fn, *req)
            if isinstance(out, Failure) and out.kind == "raised MemoryError":
                raise MemoryError
            send_frame(out_fd, ["ok", out] if isinstance(out, float) else ["fail", out.kind, out.message])
    except MemoryError:  # a leak or one huge allocation: a fresh process retries the sample
        os._exit(OUT_OF_MEMORY_EXIT)


class _Slot:
    """One child process of the pool and what it is doing."""

    def __init__(self, spec: str, memory_bytes: int) -> None:
        self.proc = start_child("kpo_lightning.rewards.workers.reward_worker_main", spec, str(memory_bytes))
        self.ready = False
        self.index: int | None = None  # the sample it works on
        self.deadline = time.monotonic() + START_TIMEOUT_S  # of its start, then of its sample

    @property
    def fd(self) -> int:
        return self.proc.stdout.fileno()


_POOLS: weakref.WeakSet[RewardPool] = weakref.WeakSet()


class RewardPool:
    """`size` persistent child processes that run the reward `spec`, one sample each at a time.

    `score` hands samples to free children and collects their answers; a sample with no answer within `timeout_s`
    scores a timeout Failure, its child is killed and replaced (the replacement's start is not counted against any
    sample); a child that dies (its memory cap of `memory_bytes` included, 0: no cap) is replaced and its sample
    retried once.
    """

    MAX_START_FAILURES = 3  # consecutive deaths while starting before the pool gives up

    def __init__(self, spec: str, size: int, memory_bytes: int = 0) -> None:
        self.spec, self.size, self.memory_bytes = spec, max(1, size), memory_bytes
        self.slots: list[_Slot] = []
        self.pid = os.getpid()
        self.lock = threading.Lock()  # one batch at a time; concurrent callers queue
        self.start_failures = 0
        _POOLS.add(self)

    def _fill(self) -> None:
        if self.pid != os.getpid():  # a forked child: the processes belong to the parent
            self.slots, self.pid = [], os.getpid()
        for slot in [s for s in self.slots if s.proc.poll() is not None]:  # died while idle
            self._replace(slot)
        while len(self.slots) < self.size:
            self.slots.append(_Slot(self.spec, self.memory_bytes))

    def _replace(self, slot: _Slot) -> None:
        kill_child(slot.proc)
        self.slots[self.slots.index(slot)] = _Slot(self.spec, self.memory_bytes)

    def score(self, items: list[tuple[str, str, str]], timeout_s: float) -> list[Outcome]:
        with self.lock:
            return self._score(items, timeout_s)

    def _score(self, items: list[tuple[str, str, str]], timeout_s: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        retried: set[int] = set()
        self._fill()
        try:
            while pending or any(s.index is not None for s in self.slots):
                for slot in self.slots:
                    if slot.ready and slot.index is None and pending:
                        i = pending.popleft()
                        slot.index, slot.deadline = i, time.monotonic() + timeout_s
                        try:
                            send_frame(slot.proc.stdin.fileno(), list(items[i]))
                        except OSError:  # died while idle: the read below sees EOF and retries
                            pass
                active = [s for s in self.slots if not s.ready or s.index is not None]
                readable = set(wait_readable([s.fd for s in active], min(s.deadline for s in active)))
                for slot in list(active):
                    if slot.fd in readable:
                        self._answer(slot, results, pending, retried)
                now = time.monotonic()
                for slot in list(self.slots):
                    if slot.deadline <= now and (slot.index is not None or not slot.ready):
                        if not slot.ready:
                            raise RuntimeError(
                                f"the reward process for {self.spec!r} did not start within {START_TIMEOUT_S:.0f}s"
                            )
                        results[slot.index] = timeout_failure(timeout_s)
                        self._replace(slot)
        except BaseException:  # SIGTERM, Ctrl-C: busy processes may be stuck or mid-answer; never reuse them
            for slot in [s for s in self.slots if s.index is not None]:
                kill_child(slot.proc)
                self.slots.remove(slot)
            raise
        return results  # type: ignore[return-value]

    def _answer(self, slot: _Slot, results: list, pending: deque, retried: set) -> None:
        msg = recv_frame(slot.fd)
        if not slot.ready:
            if msg == ["ready"]:
                slot.ready, slot.deadline, self.start_failures = True, math.inf, 0
                return
            kill_child(slot.proc)
            self.start_failures += 1
            if msg is None and self.start_failures < self.MAX_START_FAILURES:  # killed while starting: again
                self._replace(slot)
                return
            why = msg[1] if msg else f"it exited with code {slot.proc.returncode}; see its error above"
            if self.memory_bytes and ("MemoryError" in why or slot.proc.returncode == OUT_OF_MEMORY_EXIT):
                why += f" (over its memory cap: raise reward.worker_memory_mb={self.memory_bytes >> 20}, 0 = none)"
            raise RuntimeError(f"the reward process for {self.spec!r} could not start: {why}")
        i = slot.index
        if msg is None:  # the process died (killed, out of memory, a crash in C code)
            code = slot.proc.poll()
            self._replace(slot)
            if i not in retried:
                retried.add(i)
                pending.appendleft(i)
            elif code == OUT_OF_MEMORY_EXIT:
                results[i] = Failure(
                    "ran out of memory", f"over {self.memory_bytes >> 20} MB (reward.worker_memory_mb)"
                )
            else:
                results[i] = Failure("killed its reward process", f"exit code {code}")
            return
        results[i] = float(msg[1]) if msg[0] == "ok" else Failure(msg[1], msg[2])
        slot.index, slot.deadline = None, math.inf

    def close(self) -> None:
        if self.pid == os.getpid():
            for slot in self.slots:
                kill_child(slot.proc)
        self.slots = []


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS):
        pool.close()
