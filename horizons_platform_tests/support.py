"""Helpers shared by the tests: free ports, waiting on conditions, an SMTP sink, reading
topics. No mocks here — everything talks to real servers on 127.0.0.1."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from confluent_kafka import Consumer, TopicPartition

from horizons_platform.kafka.admin import watermarks
from horizons_platform.settings import Settings
from horizons_platform.store.owner import free_port  # the tests' too

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
        time.sleep(interval)
        last = condition()
    return last


def unique_topics(prefix: str | None = None) -> dict[str, str]:
    """Settings overrides giving a test its own topics (isolation on a shared broker)."""
    tag = prefix or uuid.uuid4().hex[:8]
    return {
        "topic_job_lifecycle": f"job-lifecycle-{tag}",
        "topic_job_metrics": f"job-metrics-{tag}",
        "topic_audit_trail": f"audit-trail-{tag}",
        "topic_system_health": f"system-health-{tag}",
        "topic_dlq": f"horizons-dlq-{tag}",
    }


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) on loopback that keeps what it received."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    messages: list[Message] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)  # every RCPT TO of every message
    # address → SMTP reply for RCPT TO (e.g. "550 no such user"); None accepts it.
    rcpt_policy: Callable[[str], str | None] | None = None
    tls_context: ssl.SSLContext | None = None  # offer STARTTLS with this certificate
    auth: bool = False  # accept AUTH PLAIN/LOGIN (any password), also without TLS
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self.rcpt_policy(address) if self.rcpt_policy else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content)
        with self._lock:
            self.messages.append(msg)
            self.received_at.append(time.time())
            self.recipients.extend(envelope.rcpt_tos)
        return "250 OK"

    def start(self) -> SmtpSink:
        extra: dict[str, Any] = {}
        if self.tls_context is not None:
            extra["tls_context"] = self.tls_context
        if self.auth:
            extra.update(
                authenticator=lambda *args: AuthResult(success=True),
                auth_require_tls=False,
            )
        self._controller = Controller(self, hostname=self.host, port=self.port, **extra)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def message_ids(self) -> list[str]:
        with self._lock:
            return [str(m["Message-ID"]) for m in self.messages]

    def for_job(self, job_id: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if job_id in str(m["Subject"])]


def read_topic(settings: Settings, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every message currently in ``topic`` (all partitions, from the beginning)."""
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": f"test-reader-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False}
        )
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        assign = []
        for p in meta.partitions:
            low, high = watermarks(consumer, TopicPartition(topic, p), time.monotonic() + timeout)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
        consumer.assign(assign)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error():
                    continue
                out.append(msg)
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
        return out
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer(settings.kafka_config(**{"group.id": "test-watermarks"}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: watermarks(consumer, TopicPartition(topic, p), time.monotonic() + 10)[1]
            for p in meta.partitions
        }
    finally:
        consumer.close()


@contextmanager
def running(target: Callable[[], Any]) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield thread


_ENV_FIELDS = (
    "kafka_bootstrap",
    "duckdb_path",
    "audit_signing_key_file",
    "smtp_port",
    "store_port",
    "metrics_port",
    "group_instance_id",
    "var_dir",
    "topic_job_lifecycle",
    "topic_job_metrics",
    "topic_audit_trail",
    "topic_system_health",
    "topic_dlq",
)


def consumer_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment of a `horizons consume` process using ``settings`` (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORIZONS_")}
    for name in _ENV_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            env[f"HORIZONS_{name.upper()}"] = str(value)
    env.update({f"HORIZONS_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def horizons(
    settings: Settings, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the `horizons` command line as a user would, with ``settings`` as HORIZONS_*."""
    return subprocess.run(
        [sys.executable, "-m", "horizons_platform.cli", *args],
        env=consumer_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_consumer(
    settings: Settings, log: Path, *, services: Sequence[str] = (), **extra: object
) -> subprocess.Popen[bytes]:
    """`horizons consume` (``services``, default all four) as a real process, output
    appended to ``log``."""
    chosen = [arg for name in services for arg in ("--service", name)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "horizons_platform.cli", "consume", *chosen],
            env=consumer_env(settings, **extra),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def record_in_the_past(
    store: Any, events: list[tuple[bytes, datetime]], topic: str = "archive"
) -> None:
    """Audit rows exactly as the auditor writes them (chained by the project's own code),
    but recorded at the given times: a store that has been running for months. The
    auditor cannot be asked to record in the past, so tests of retention by recorded_at
    start here. Call it before a host writes to the store (a running auditor keeps the
    chain's tail in memory)."""
    from horizons_platform.kafka.records import Batch
    from horizons_platform.services.audit import AuditHandler, audit_columns

    handler = AuditHandler(store.settings)
    store.ensure_schema()
    with store.transaction() as con:
        first = con.execute(
            'SELECT coalesce(max("offset"), -1) + 1 FROM audit_log WHERE topic = ?', [topic]
        ).fetchall()[0][0]
        for i, (value, at) in enumerate(events):
            batch = Batch.decode([topic], [0], [first + i], [None], [value], [0])
            handler.persist(con, {"audit_log": audit_columns(batch, at)})
            handler.after_commit({})


def run_jobs(
    settings: Settings, prefix: str, n: int, owner: str = "ada@observatory.example"
) -> int:
    """n jobs submitted, started and completed through the orchestrator; the event count."""
    from horizons_platform.services.orchestrator import JobOrchestratorService

    orch = JobOrchestratorService(settings, recover=False, wait=False)
    for i in range(n):
        orch.submit_job(f"{prefix}-{i}", owner=owner, job_type="imaging")
        orch.start_job(f"{prefix}-{i}")
        orch.complete_job(f"{prefix}-{i}")
    orch.flush()
    return 3 * n
