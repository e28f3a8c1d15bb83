"""Threads the OS can tell apart.

Python names its threads for itself only; `top -H`, `ps -L` and /proc show every thread
of the host as "python". Each host thread writes a short form of its name (Linux keeps
15 bytes) into its own ``comm``, so an operator — or `horizons bench latency` — sees
which service a busy thread belongs to. A host's threads' stacks can be asked for at any
time (``dump_stacks_on``: ``kill -USR1 <pid>``) and are written by themselves when a
shutdown is slow (``dump_stacks_after``); a stopped host leaves even when a thread it
does not own never ends (``exit_within``); and a stop signal is acted on by a thread of
its own, never inside the signal handler (``on_signals``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path

_log = logging.getLogger(__name__)

# Group names shortened so that a service and its role fit in 15 bytes.
_SHORT = (
    ("compliance-auditor", "auditor"),
    ("notifications", "notify"),
    ("system-health", "health"),
    ("consumer-", "loop-"),
)


def os_name(name: str) -> str:
    """The 15-byte form of a Python thread name ("store-compliance-auditor_0" →
    "store-auditor")."""
    for long, short in _SHORT:
        name = name.replace(long, short)
    return re.sub(r"_0$", "", name)[:15]


def name_this_thread() -> None:
    """Give the calling OS thread its Python thread's name (Linux; elsewhere a no-op)."""
    comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
    with contextlib.suppress(OSError):
        comm.write_text(os_name(threading.current_thread().name))


def run_in_background(nice: int) -> None:
    """Lower the calling OS thread's priority by ``nice`` steps (Linux keeps a nice value
    per thread; elsewhere, or where refused, a no-op). Under contention such a thread
    gets about a tenth of the CPU time of one at the process's priority (nice 10), and
    any idle core in full."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))


def dump_stacks_on(signum: int = signal.SIGUSR1) -> None:
    """Write every thread's Python stack to stderr (the host log) when ``signum`` arrives.

    faulthandler's handler runs in C and needs no GIL, so it answers even a host whose
    Python threads are deadlocked — the one moment an operator needs it."""
    faulthandler.register(signum, all_threads=True, chain=False)


def dump_stacks_after(seconds: float) -> None:
    """Write every thread's stack to stderr once, ``seconds`` from now, unless
    ``exit_within`` (or another call) re-arms the watchdog first: a shutdown that takes
    longer than it should then says where it waits."""
    faulthandler.dump_traceback_later(seconds, exit=False)


def exit_within(seconds: float) -> None:
    """Make sure this process is gone ``seconds`` from now, whatever still runs.

    Called once the host has flushed and closed everything it owns. The interpreter's
    exit then joins every non-daemon thread a library started; one that never ends (a
    Kafka client's destroy waiting on a broker, a pool worker in a socket call) would keep
    a SIGTERMed host alive for ever, and its supervisor (or `horizons up`) waiting on it.
    faulthandler's watchdog is a C thread that needs no GIL: past the deadline it writes
    every thread's stack to stderr — the reason, for the log — and exits with status 1.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)


def on_signals(signals: tuple[int, ...], action: Callable[[int], None]) -> Callable[[], None]:
    """Call ``action(signum)`` for each of ``signals`` that arrives, on a thread of its own.
    Returns a function (for the main thread) that stops watching: the signals are then
    ignored, as a process already on its way out should (its exit is bounded anyway,
    ``exit_within``), and the pipe is closed.

    A Python signal handler runs in the main thread between two of its bytecodes, which
    may be inside ``Event.wait()`` holding the lock ``Event.set()`` takes, or inside a
    first handler's ``set()``: a handler that set the stop event itself could wait for
    ever on its own thread. (CI: two SIGTERMs a moment apart left a host hung in
    ``set()`` until it was killed.) So the handler only writes the signal's number into a
    pipe, which takes no lock, and a watcher thread reads it and acts."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # a full pipe: stops are already pending
            os.write(write_fd, bytes([signum]))

    stopped = threading.Event()

    def watch() -> None:
        name_this_thread()
        while data := os.read(read_fd, 64):
            for signum in data:
                if stopped.is_set():
                    break  # the process is on its way out: a late stop must not re-arm anything
                try:
                    action(signum)
                except Exception:
                    # The watcher must outlive its action (a print into a closed pipe):
                    # without it every later signal, the second Ctrl-C too, is lost.
                    _log.exception("acting on signal %d", signum)
        os.close(read_fd)

    watcher = threading.Thread(target=watch, name="signals", daemon=True)
    watcher.start()
    for signum in signals:
        signal.signal(signum, handler)

    def stop() -> None:
        stopped.set()
        for signum in signals:  # first: a closed descriptor's number is soon reused
            signal.signal(signum, signal.SIG_IGN)
        os.close(write_fd)  # the watcher reads the end of the pipe and returns
        watcher.join(5.0)

    return stop
