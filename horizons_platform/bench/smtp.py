"""A real SMTP server (aiosmtpd) on loopback that records when each e-mail arrived.

It can be stopped and started again on the same port, which is how the SMTP-outage
fault is injected.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes
from typing import Any

from aiosmtpd.controller import Controller

from horizons_platform.bench.harness import HOST, free_port

# aiosmtpd logs every SMTP command at INFO: thousands of lines per benchmark.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Received:
    at: float  # wall clock, seconds
    message_id: str
    notification_id: str
    subject: str


class SmtpSink:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

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
        return "250 OK"

    def start(self) -> SmtpSink:
        self._controller = Controller(self, hostname=HOST, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def distinct(self) -> int:
        with self._lock:
            return len({r.message_id for r in self.received})

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
