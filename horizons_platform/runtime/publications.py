"""The publication outbox: events that must reach Kafka leave from the store.

An alert, a recovery or an audit record (a retention run, an offsets reset, a dead-letter
replay) is written to ``publications`` in the same transaction as the state that caused
it, then published from there and deleted once Kafka acknowledged it. A broker outage
delays it; it never drops it. Delivery to Kafka is at-least-once (the event_id in every
envelope identifies a repeat).

Who publishes: the writer itself right after its commit (:func:`publish_now`, so an
alert is on the topic within milliseconds when the broker is up), and the host's
:class:`PublicationDispatcher`, which picks up whatever is left — written while the
broker was down, or by a process that exited before the broker came back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

from horizons_platform import events as ev
from horizons_platform.kafka.producer import Publisher
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase
from horizons_platform.store.sql import literal

log = logging.getLogger(__name__)

# The dispatcher leaves fresh rows to the process that wrote them (publish_now) for this
# long, so the two rarely send the same row twice.
DISPATCH_AFTER_S = 5.0
BATCH = 500
# How long a stopping host still waits for delivery reports: a reachable broker answers
# in milliseconds, and the auditor's last signed head must reach its witness before the
# host exits; an unreachable one is not waited out (the outbox keeps the rows).
STOP_GRACE_S = 2.0


def enqueue(con: Any, topic: str, event: ev.Envelope, *, key: str | None = None) -> str:
    """Add ``event`` to the outbox inside the caller's transaction; returns its id."""
    tables.insert(con, "publications", [tables.publication_row(topic, event, key)])
    return str(event.event_id)


def enqueue_audit(
    con: Any, settings: Settings, actor: str, action: str, details: dict[str, Any], producer: str
) -> str:
    return enqueue(
        con,
        settings.topic_audit_trail,
        ev.audit_record(actor, action, details, producer),
        key=action,
    )


def publish(
    store: StoreBase,
    publisher: Publisher,
    *,
    ids: list[str] | None = None,
    older_than_s: float = 0.0,
    stop: threading.Event | None = None,
) -> tuple[int, int]:
    """Send pending publications (``ids``, or all older than ``older_than_s``), delete the
    ones Kafka acknowledged. Returns (published, still pending among those tried).

    It waits for every message's delivery report, which librdkafka gives within the
    publisher's delivery timeout, or at most STOP_GRACE_S once ``stop`` is set. Giving
    up earlier (a fixed 10 s wait once) left messages in flight and in the outbox: the
    next sweep sent them again, and both copies arrived (CI, a broker restarted on a
    loaded machine: one alert published twice). A host stopping while the broker is away
    waited out the delivery timeout (CI: 10–19 s past the consumers' exit); giving up at
    the stop at once left even a reachable broker's acknowledgement of the last signed
    head unheard, so the head stayed in the outbox until the next host."""
    if ids is not None and not ids:
        return 0, 0
    where = (
        f"publication_id IN ({', '.join(literal(i) for i in ids)})"
        if ids is not None
        else f"created_at <= now() - to_milliseconds({int(older_than_s * 1000)})"
    )
    with store.reader() as con:
        rows = con.execute(
            f'SELECT publication_id, topic, "key", value, headers FROM publications '
            f"WHERE {where} ORDER BY created_at LIMIT {BATCH}"
        ).fetchall()
    if not rows:
        return 0, 0
    acked: list[str] = []
    errors: dict[str, str] = {}
    lock = threading.Lock()

    def report(pid: str) -> Any:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            with lock:
                if err is None:
                    acked.append(pid)
                else:
                    errors[pid] = err.str()

        return on_delivery

    for pid, topic, key, value, headers in rows:
        try:
            publisher.send_async(
                topic,
                value.encode(),
                key=key,
                headers=[(k, v.encode()) for k, v in json.loads(headers or "[]")],
                on_delivery=report(pid),
            )
        except KafkaException as exc:
            with lock:
                errors[pid] = str(exc)

    def all_reported() -> bool:
        with lock:
            return len(acked) + len(errors) >= len(rows)

    publisher.await_reports(all_reported, stop, STOP_GRACE_S)
    with lock:
        done, failed = list(acked), dict(errors)
    if done or failed:
        with store.transaction() as con:
            if done:
                con.execute(
                    "DELETE FROM publications WHERE publication_id IN "
                    f"({', '.join(literal(i) for i in done)})"
                )
            for pid, error in failed.items():
                con.execute(
                    "UPDATE publications SET attempts = attempts + 1, last_error = ? "
                    "WHERE publication_id = ?",
                    [error[:500], pid],
                )
    pending = len(rows) - len(done)
    if pending:
        log.warning(
            "publications: %d of %d not acknowledged by Kafka yet; they stay in the outbox",
            pending,
            len(rows),
        )
    return len(done), pending


def publish_now(
    store: StoreBase,
    publisher: Publisher | None,
    ids: list[str],
    stop: threading.Event | None = None,
) -> None:
    """Best effort right after the commit; the host's dispatcher retries what is left.
    ``stop`` (a host's) ends the wait for delivery reports when the host stops."""
    if publisher is None or not ids:
        return
    try:
        publish(store, publisher, ids=ids, stop=stop)
    except Exception:
        log.exception("publications: could not publish now; the host's dispatcher will")


class PublicationDispatcher:
    """In the consumer host: publishes what is left in the outbox, with backoff, and
    what a consumer's committed batch enqueued (:meth:`publish_soon`) right away."""

    def __init__(
        self,
        settings: Settings,
        store: StoreBase,
        publisher: Publisher,
        stop_event: threading.Event,
        interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.stop_event = stop_event
        self.interval_s = interval_s
        self.published = 0
        self._soon: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def publish_soon(self, ids: list[str]) -> None:
        """Publish these (committed) publications now, on the dispatcher's thread: the
        committing thread does not wait for Kafka."""
        with self._lock:
            self._soon.extend(ids)
        self._wake.set()

    def drain(self) -> None:
        """What the consumers handed over while stopping (the auditor's last signed head),
        once they have stopped: the host calls this after joining its threads."""
        with self._lock:
            soon, self._soon = self._soon, []
        if soon:
            publish_now(self.store, self.publisher, soon, self.stop_event)

    def run(self) -> None:
        delay = self.interval_s
        sweep_at = time.monotonic() + delay
        while not self.stop_event.is_set():
            # Short waits: a stop is noticed within half a second whatever the backoff.
            self._wake.wait(min(0.5, max(0.0, sweep_at - time.monotonic())))
            self._wake.clear()
            with self._lock:
                soon, self._soon = self._soon, []
            if soon:
                try:
                    sent, _ = publish(self.store, self.publisher, ids=soon, stop=self.stop_event)
                    self.published += sent
                except Exception:
                    # Still in the outbox: the sweep sends them once they are older.
                    log.exception("publications: could not publish now; the sweep will")
            if time.monotonic() < sweep_at:
                continue
            try:
                sent, pending = publish(
                    self.store, self.publisher, older_than_s=DISPATCH_AFTER_S, stop=self.stop_event
                )
                self.published += sent
                # Back off while the broker refuses; drain at once while it accepts.
                delay = (
                    min(delay * 2, 15.0) if pending else (0.0 if sent >= BATCH else self.interval_s)
                )
            except Exception:
                log.exception("publications: dispatch failed; retrying")
                delay = min(max(delay, 1.0) * 2, 15.0)
            sweep_at = time.monotonic() + delay
