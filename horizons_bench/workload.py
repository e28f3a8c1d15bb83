"""Traffic for the benchmarks: the platform's own job simulation, counted on delivery.

Events come from :mod:`horizons_platform.simulate` driven through the real
JobOrchestratorService, so the benchmark publishes exactly what production publishes.
The publisher underneath is the platform's idempotent Publisher, wrapped so every
acknowledged message lands in a :class:`Ledger` — the "produced" side of every
produced-vs-stored comparison (an unacknowledged message was never produced).

At a steady rate the orchestrator can also run ahead of time (:func:`encode_jobs`) and
its messages be replayed at the rate (:func:`replay`): driven live at 1,000 events/s it
took ~0.23 of this machine's 2 cores, which the measured platform then did not have
(a real orchestrator runs elsewhere); replayed, ~0.04.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message

from horizons_platform import events as ev
from horizons_platform.kafka.producer import Headers, Publisher
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation

# Lifecycle + metrics events per simulated job with the default fates (3 for a job
# cancelled while queued, 4 otherwise): used to size a run in events.
EVENTS_PER_JOB = 3.975
INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Sent:
    topic: str
    partition: int
    offset: int
    ts: float  # Kafka CreateTime (producer clock), seconds
    kind: str  # event_type, or "invalid"
    key: bytes | None


@dataclass
class Ledger:
    """Every message Kafka acknowledged, by kind and topic (and one by one if tracked)."""

    track: bool = False
    by_kind: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    invalid_by_topic: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # delivery error → count
    sent: list[Sent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, err: KafkaError | None, msg: Message, kind: str) -> None:
        with self._lock:
            if err is not None:
                self.failed += 1
                self.errors[err.name()] += 1
                return
            topic = msg.topic() or ""
            self.by_kind[kind] += 1
            self.by_topic[topic] += 1
            if kind == INVALID:
                self.invalid_by_topic[topic] += 1
            if self.track:
                _, ts_ms = msg.timestamp()
                self.sent.append(
                    Sent(
                        topic,
                        msg.partition() or 0,
                        msg.offset() or 0,
                        ts_ms / 1000,
                        kind,
                        msg.key(),
                    )
                )

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def valid_events(self) -> int:
        return self.total - self.by_kind[INVALID]

    @property
    def jobs(self) -> int:
        return self.by_kind[ev.JOB_SUBMITTED]

    @property
    def terminal(self) -> int:
        return sum(self.by_kind[t] for t in ev.TERMINAL_TYPES)

    def summary(self) -> dict[str, Any]:
        return {
            "acknowledged": self.total,
            "failed": self.failed,
            "errors": dict(self.errors),
            "by_kind": dict(self.by_kind),
            "invalid_by_topic": dict(self.invalid_by_topic),
        }


class LedgerPublisher(Publisher):
    """The platform Publisher, recording each delivery report in a Ledger."""

    def __init__(self, settings: Settings, ledger: Ledger, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.ledger = ledger

    def send_async(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: str | bytes | None,
        headers: Headers | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
        kind: str | None = None,
    ) -> None:
        if kind is None:
            kind = dict(headers or []).get("event_type", INVALID.encode()).decode()

        def report(err: KafkaError | None, msg: Message) -> None:
            self.ledger.record(err, msg, kind)
            if on_delivery is not None:
                on_delivery(err, msg)

        super().send_async(topic, value, key=key, headers=headers, on_delivery=report)

    def flush(self, timeout: float | None = None) -> int:
        # The orchestrator flushes with its own 30 s; the bench's producer must outlast
        # the faults it injects, so it always waits up to its delivery timeout.
        return super().flush(max(timeout or 0.0, self.delivery_timeout_s))


def bulk_publisher(settings: Settings, ledger: Ledger, **extra: Any) -> LedgerPublisher:
    """For pre-producing large volumes: bigger batches; consumers are measured later."""
    conf: dict[str, Any] = {"linger.ms": 20, "queue.buffering.max.messages": 500_000}
    conf.update(extra)
    return LedgerPublisher(settings, ledger, **conf)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message as the orchestrator handed it to its publisher."""

    topic: str
    value: bytes | None
    key: str | bytes | None
    headers: Headers
    kind: str


class Recorder(Publisher):
    """Keeps what the orchestrator sends instead of sending it (:func:`encode_jobs`).
    A Publisher without a producer: the orchestrator, run with ``wait=False``, only
    calls send_async, poll and flush."""

    def __init__(self, settings: Settings) -> None:  # no super(): no Kafka client
        self.settings = settings
        self.delivery_timeout_s = 0.0
        self.messages: list[Outgoing] = []

    def send_async(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: str | bytes | None,
        headers: Headers | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        kind = dict(headers or []).get("event_type", INVALID.encode()).decode()
        self.messages.append(Outgoing(topic, value, key, list(headers or []), kind))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float | None = None) -> int:
        return 0


def encode_jobs(settings: Settings, events: int, *, seed: int = 7) -> list[Outgoing]:
    """About ``events`` job events, encoded by the orchestrator now, to :func:`replay`
    later. (Their ``occurred_at`` is the encoding time: a job's events then lie
    microseconds apart, which nothing measured depends on.)"""
    recorder = Recorder(settings)
    produce_jobs(settings, events, recorder, seed=seed)
    return recorder.messages


def replay(
    publisher: LedgerPublisher,
    messages: list[Outgoing],
    *,
    rate: float,
    progress: Callable[[int, int], None] | None = None,
    tick_s: float = 0.002,
) -> int:
    """Send ``messages`` at ``rate`` per second, in ticks of ``tick_s`` (the platform
    producer's linger.ms: finer ticks would not reach the broker sooner, and a sleep
    per message costs a wake-up each). Returns the number sent; the ledger has the
    acknowledgements."""
    start = time.monotonic()
    total = len(messages)
    for i, m in enumerate(messages):
        ahead = start + i / rate - time.monotonic()
        if ahead > tick_s:
            time.sleep(ahead)  # pacing the producer, not synchronisation
        publisher.send_async(m.topic, m.value, key=m.key, headers=m.headers, kind=m.kind)
        if progress and i % 1000 == 0:
            progress(i, total)
    publisher.flush()
    if progress:
        progress(total, total)
    return total


class Stopped(Exception):
    """Raised from the progress hook to end a simulation early."""


def produce_jobs(
    settings: Settings,
    events: int,
    publisher: Publisher,
    *,
    rate: float = 0.0,
    seed: int = 7,
    fail_rate: float = 0.1,
    cancel_rate: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    chunk_jobs: int = 2_000,
) -> int:
    """Publish about ``events`` job events (whole jobs) at ``rate`` events/s (0 = flat out).

    Jobs are planned in chunks so a million-event run never holds a million plans.
    Returns the number of events handed to the producer; the ledger has the acks.
    """
    orch = JobOrchestratorService(settings, publisher, recover=False, wait=False)
    n_jobs = max(1, math.ceil(events / EVENTS_PER_JOB))
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    sent_before = 0
    handed = [0]  # events handed over so far, also when stopped mid-chunk

    def hook(sent: int, _total: int) -> None:
        handed[0] = sent_before + sent
        if stop is not None and stop.is_set():
            raise Stopped
        if progress:
            progress(handed[0], events)

    try:
        for first in range(0, n_jobs, chunk_jobs):
            jobs = plan(
                min(chunk_jobs, n_jobs - first),
                seed=seed + first,
                fail_rate=fail_rate,
                cancel_rate=cancel_rate,
                prefix=f"{prefix}-c{first // chunk_jobs}",
            )
            sent_before += run_simulation(orch, jobs, rate=rate, seed=seed + first, progress=hook)
            handed[0] = sent_before
    except Stopped:
        pass
    finally:
        orch.flush(publisher.delivery_timeout_s + 10)
    return handed[0]
