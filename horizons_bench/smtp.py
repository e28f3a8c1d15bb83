"""A real SMTP server (aiosmtpd) on loopback that records what arrived and when: the one
SMTP server of the tests and the benchmarks.

It can be stopped and started again on the same port, which is how the SMTP-outage
fault is injected. ``SmtpSink(own_process=True)`` runs the server in a process of its
own (as a mail server would be), writing one line per e-mail to a file the bench reads:
inside the bench's process it would share one GIL with the producer and the offset
probe, and its own queueing would count as the platform's e-mail latency.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from horizons_bench.harness import HOST
from horizons_platform.store.owner import free_port

# aiosmtpd logs every SMTP command at INFO: thousands of lines per benchmark.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Received:
    at: float  # wall clock, seconds
    message_id: str
    notification_id: str
    subject: str


class SmtpSink:
    """The SMTP server of the tests and the benchmarks. In process it keeps every message
    (parsed), its recipients and its arrival time, and can refuse recipients
    (``rcpt_policy``: address → an SMTP reply such as "550 no such user", None accepts),
    offer STARTTLS (``tls_context``) and accept any AUTH (``auth``, also without TLS)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        own_process: bool = False,
        rcpt_policy: Callable[[str], str | None] | None = None,
        rcpt_delay: Callable[[str], float] | None = None,
        tls_context: ssl.SSLContext | None = None,
        auth: bool = False,
    ) -> None:
        if own_process and (rcpt_policy or rcpt_delay or tls_context or auth):
            raise ValueError(
                "rcpt_policy, rcpt_delay, tls_context and auth need the in-process sink"
            )
        self.host = HOST
        self.port = port or free_port()
        self.rcpt_policy = rcpt_policy
        self.rcpt_delay = rcpt_delay
        self.tls_context = tls_context
        self.auth = auth
        self.received: list[Received] = []
        self.messages: list[Message] = []  # in process only
        self.recipients: list[str] = []  # every RCPT TO of every message (in process only)
        self.rcpt_seen: list[str] = []  # every RCPT TO as it arrived, before any answer
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self._own_process = own_process
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        with self._lock:
            self.rcpt_seen.append(address)
        delay = self.rcpt_delay(address) if self.rcpt_delay else 0.0
        if delay > 0:  # a slow relay: this session waits, the server's others go on
            await asyncio.sleep(delay)
        reply = self.rcpt_policy(address) if self.rcpt_policy else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = time.time()
        msg = message_from_bytes(envelope.content)
        with self._lock:
            self.received.append(
                Received(
                    at,
                    str(msg["Message-ID"]),
                    str(msg["X-Horizons-Notification-Id"]),
                    str(msg["Subject"]),
                )
            )
            self.messages.append(msg)
            self.recipients.extend(envelope.rcpt_tos)
        return "250 OK"

    def start(self) -> SmtpSink:
        if self._own_process:
            return self._start_process()
        extra: dict[str, Any] = {}
        if self.tls_context is not None:
            extra["tls_context"] = self.tls_context
        if self.auth:
            extra.update(
                authenticator=lambda *args: AuthResult(success=True),
                auth_require_tls=False,
            )
        self._controller = Controller(self, hostname=HOST, port=self.port, **extra)
        self._controller.start()
        return self

    @property
    def pid(self) -> int:
        """The server's process (this one unless ``own_process``)."""
        return self._proc.pid if self._proc is not None else os.getpid()

    def _start_process(self) -> SmtpSink:
        fd, name = tempfile.mkstemp(prefix="horizons-smtp-", suffix=".log")
        os.close(fd)
        self._log = Path(name)
        atexit.register(self._log.unlink, missing_ok=True)  # read after stop(), gone at exit
        command = [sys.executable, "-m", __name__, "--port", str(self.port), "--log", name]
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self._log.stat().st_size == 0:  # the server writes "ready" when it listens
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SMTP sink process did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._controller is not None or self._proc is not None

    def snapshot(self) -> list[Received]:
        if self._log is not None:
            self._read_log()
        with self._lock:
            return list(self.received)

    def distinct(self) -> int:
        return len({r.message_id for r in self.snapshot()})

    def message_ids(self) -> list[str]:
        return [r.message_id for r in self.snapshot()]

    @property
    def received_at(self) -> list[float]:
        return [r.at for r in self.snapshot()]

    def for_job(self, job_id: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if job_id in str(m["Subject"])]

    def _read_log(self) -> None:
        assert self._log is not None
        lines = self._log.read_text().splitlines()[1:]  # after "ready"
        received = []
        for line in lines:
            parts = line.split("\t")
            if len(parts) == 4:  # a line still being written is skipped until complete
                received.append(Received(float(parts[0]), parts[1], parts[2], parts[3]))
        with self._lock:
            self.received = received

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Recorder:
    """The server side of ``SmtpSink(own_process=True)``: one line per e-mail."""

    def __init__(self, out: Any) -> None:
        self.out = out

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = time.time()
        msg = message_from_bytes(envelope.content)
        fields = [msg["Message-ID"], msg["X-Horizons-Notification-Id"], msg["Subject"]]
        clean = [" ".join(str(f).split()) for f in fields]
        self.out.write(f"{at:.6f}\t" + "\t".join(clean) + "\n")
        self.out.flush()
        return "250 OK"


def _serve(port: int, log: str) -> None:
    with open(log, "a") as out:
        controller = Controller(_Recorder(out), hostname=HOST, port=port)
        controller.start()
        out.write("ready\n")
        out.flush()
        try:
            threading.Event().wait()
        finally:
            controller.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    _serve(args.port, args.log)
