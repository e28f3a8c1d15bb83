"""The outbox's SMTP sessions, in a process of their own.

Why a process: smtplib is Python on every one of an e-mail's four round trips, and 16
sessions in the consumer host fought its four consumer loops for one GIL — each session
waking from a socket read waited for the GIL behind a loop validating a batch, and each
wake-up took it from the loops. Measured with all four services in one host
(`horizons bench ingest --events 100000 --service system-health`): 2,079-2,558 events/s
per group with 16 in-host sessions, 4,494-4,862 with one (docs/kpis.md). In a process of
its own the sessions have their own interpreter; the host keeps everything that touches
the store (claims, outcomes, renewals: runtime/outbox.py).

The two talk over the child's stdin/stdout in pickled frames (a private pipe between a
process and the child it started):

    host → sender   ("settings", Settings)   once, first
                    ("send", [Claimed, …])   queue these; also: the server is worth
                                             another try (after a session lost it)
                    ("close",)               finish what is being sent, hand back the rest
    sender → host   ("outcome", Outcome, seconds | None)   one per message taken
                    ("log", level, text)                   the sender's log records
                    ("closed", [notification_id, …])       queued, never attempted

A sender whose host dies (stdin at EOF) exits at once without sending anything still
queued: those rows are claimed again after the claim timeout, as a crash always did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from horizons_platform.runtime.smtp import Claimed, Outcome, SmtpSession, deliver
from horizons_platform.settings import Settings
from horizons_platform.threads import name_this_thread

log = logging.getLogger("horizons_platform.runtime.outbox")


class SmtpSender:
    """The host's handle on the sender process: start it, hand it messages, close it.

    ``on_outcome(outcome, seconds)`` and ``on_exit(generation, reason)`` are called on
    this object's reader thread. Every process started gets a new ``generation``; a
    process that exits without being closed reports its generation through ``on_exit``
    (its messages' fate is unknown), and the next :meth:`send` starts another.
    """

    def __init__(
        self,
        settings: Settings,
        on_outcome: Callable[[Outcome, float | None], None],
        on_exit: Callable[[int, str], None],
    ) -> None:
        self.settings = settings
        self.on_outcome = on_outcome
        self.on_exit = on_exit
        self.generation = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        self._released: list[str] = []

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._closing = False
        self._closed.clear()
        self.generation += 1
        # Started from the outbox's thread, the process inherits its (background)
        # priority: Linux copies the forking thread's nice value.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "horizons_platform.runtime.sender"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._reader = threading.Thread(
            target=self._read,
            args=(self._proc, self.generation),
            name="smtp-sender",
            daemon=True,
        )
        self._reader.start()
        self._write(("settings", self.settings))

    def send(self, claimed: list[Claimed]) -> int:
        """Queue ``claimed`` in the sender (started if need be); the generation they went
        to. A sender gone between the start and the write reports them through
        ``on_exit`` like the rest of its messages."""
        self.start()
        generation = self.generation
        self._write(("send", claimed))
        return generation

    def close(self) -> list[str]:
        """Let each session finish its message; the ids still queued (never attempted)."""
        proc = self._proc
        if proc is None:
            return []
        self._closing = True
        self._write(("close",))
        wait = self.settings.smtp_timeout_s * 2 + 5
        if not self._closed.wait(wait):
            log.warning("outbox: the SMTP sender did not close within %.0fs; killing it", wait)
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        self._proc = None
        released, self._released = self._released, []
        return released

    def _write(self, message: tuple[Any, ...]) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            with self._write_lock:
                pickle.dump(message, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
        except OSError:  # it died: its reader reports the exit (and with it these)
            pass

    def _read(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        name_this_thread()
        assert proc.stdout is not None
        while True:
            try:
                message = pickle.load(proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            kind = message[0]
            if kind == "outcome":
                self.on_outcome(message[1], message[2])
            elif kind == "log":
                log.log(message[1], "%s", message[2])
            elif kind == "closed":
                self._released = list(message[1])
                self._closed.set()
        code = proc.wait()
        if not self._closed.is_set():
            self._closed.set()
            reason = f"the SMTP sender process exited (code {code}) while sending"
            if not self._closing:
                log.error("outbox: %s; starting another at the next claim", reason)
            self.on_exit(generation, reason)


# --- the sender process ------------------------------------------------------------------


class _Channel:
    """Frames to the host, from any of the sender's threads."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            pickle.dump(message, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._out.flush()


class _ToHost(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # the host is gone: nothing to tell
            self.channel.send(("log", record.levelno, self.format(record)))


class _Pool:
    """The sessions: each takes the next queued message as soon as it is free."""

    def __init__(self, settings: Settings, channel: _Channel) -> None:
        self.settings = settings
        self.channel = channel
        self._cond = threading.Condition()
        self._queue: deque[Claimed] = deque()
        self._down: str | None = None  # a session lost the server: why (until the next send)
        self._closing = False
        sessions = [SmtpSession(settings) for _ in range(max(1, settings.smtp_connections))]
        self._workers = [
            threading.Thread(target=self._work, args=(s,), name=f"smtp_{i}", daemon=True)
            for i, s in enumerate(sessions)
        ]
        self._sessions = sessions
        for worker in self._workers:
            worker.start()

    def add(self, claimed: list[Claimed]) -> None:
        with self._cond:
            self._down = None  # worth another try
            self._queue.extend(claimed)
            self._cond.notify_all()

    def close(self) -> list[str]:
        with self._cond:
            self._closing = True
            released = [n.notification_id for n in self._queue]
            self._queue.clear()
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(self.settings.smtp_timeout_s * 2 + 1)
        for session in self._sessions:
            session.drop()
        return released

    def _work(self, session: SmtpSession) -> None:
        name_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                n = self._queue.popleft()
                down = self._down
            seconds: float | None = None
            if down is not None:  # the server is gone: the rest wait for the next try
                outcome = Outcome(n.notification_id, n.attempts, f"not attempted: {down}")
            else:
                started = time.monotonic()
                try:
                    outcome = deliver(self.settings, session, n)
                except Exception as exc:  # a bug here must not strand the claim
                    log.exception("outbox: sending %s failed", n.notification_id)
                    outcome = Outcome(n.notification_id, n.attempts, f"{type(exc).__name__}: {exc}")
                seconds = time.monotonic() - started
            with self._cond:
                if outcome.error is not None and session.lost and self._down is None:
                    self._down = outcome.error
            self.channel.send(("outcome", outcome, seconds))


def main() -> None:
    # Ctrl-C reaches the whole process group, and `horizons up`, like a service manager,
    # stops the host with a SIGTERM to the group: the host decides when the sender stops
    # (it lets each session finish its message). Killed at SIGTERM, the sender took its
    # e-mails in flight with it, and a clean stop logged an error and sent them again.
    # A host that dies instead closes the sender's stdin: it exits then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print cannot corrupt the frames
    channel = _Channel(out)
    root = logging.getLogger()
    root.handlers = [_ToHost(channel)]
    root.setLevel(logging.INFO)
    try:
        kind, settings = pickle.load(inp)
    except EOFError:
        return  # started by hand with nothing to read: it imports, and that is all
    if kind != "settings":
        raise SystemExit(f"expected the settings first, got {kind!r}")
    pool = _Pool(settings, channel)
    while True:
        try:
            message = pickle.load(inp)
        except (EOFError, OSError):
            os._exit(0)  # the host is gone: nothing still queued may be sent now
        if message[0] == "send":
            pool.add(message[1])
        elif message[0] == "close":
            channel.send(("closed", pool.close()))
            return


if __name__ == "__main__":
    main()
