"""THE consumer loop: one implementation, used by all four services.

Per batch: poll (by count and by time) → decode → the service's handler → one DuckDB
transaction holding the rows, the dead letters and the group's next offsets → commit
the same offsets to Kafka (so Kafka's tools show lag). On every assignment the loop
seeks to the offsets stored in DuckDB, which makes DuckDB — not Kafka — the truth:
a crash between the two commits replays nothing that was stored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from horizons_platform.events import EventDecodeError, decode
from horizons_platform.kafka.producer import Publisher
from horizons_platform.services.audit import safe_text
from horizons_platform.services.base import Handler, Output, Record, Rows, now
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BROKER_LOST = 3

SIGNAL_INTERVAL_S = 1.0
DLQ_MAX_VALUE_BYTES = 512 * 1024


@dataclass
class DeadLetter:
    record: Record
    error_class: str
    error_message: str


@dataclass
class LoopStats:
    """Counters the health rules read (flushed to ``health_signals`` about once a second)."""

    processed: int = 0
    errors: int = 0
    dead_letters: int = 0
    batches: int = 0
    last_flush: float = field(default_factory=time.monotonic)
    total_processed: int = 0

    def take(self) -> dict[str, int]:
        out = {
            "processed": self.processed,
            "errors": self.errors,
            "dead_letters": self.dead_letters,
        }
        self.processed = self.errors = self.dead_letters = 0
        self.last_flush = time.monotonic()
        return out


class ConsumerLoop:
    def __init__(
        self,
        handler: Handler,
        settings: Settings,
        store: StoreBase,
        *,
        publisher: Publisher | None = None,
        stop_event: threading.Event | None = None,
        client_id: str | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.store = store
        self.group = handler.group
        self.publisher = publisher or Publisher(settings)
        self.stop_event = stop_event or threading.Event()
        self.stats = LoopStats()
        self.ready = threading.Event()  # set once partitions are assigned
        self._broker_down_since: float | None = None
        self._next_probe = 0.0
        self._probe_delay = 0.5
        self._client_id = client_id or f"{self.group}-{socket.gethostname()}-{os.getpid()}"
        self._consumer = Consumer(
            settings.kafka_config(
                **{
                    "group.id": self.group,
                    "client.id": self._client_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 20,
                    "session.timeout.ms": 10_000,
                    "heartbeat.interval.ms": 1_000,
                    # Bounds how long close() waits on a dead coordinator (default 60 s).
                    "socket.timeout.ms": 10_000,
                    "error_cb": self._on_error,
                }
            )
        )

    # --- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> int:
        """Consume until stopped (exit 0) or the broker stays lost past the grace period."""
        self._consumer.subscribe(
            self.handler.topics(), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        code = EXIT_OK
        try:
            while not self.stop_event.is_set():
                messages = self._consumer.consume(
                    num_messages=self.settings.batch_max_messages,
                    timeout=self.settings.batch_max_wait_s,
                )
                if messages:
                    self._broker_down_since = None
                    self.process(messages)
                elif self._broker_down_since is not None and self._broker_still_down():
                    code = EXIT_BROKER_LOST
                    break
                self._maybe_flush_signals()
        finally:
            self._close(code)
        return code

    def _close(self, code: int) -> None:
        try:
            self._maybe_flush_signals(force=True)
        except Exception:  # the store may be the reason we stop
            log.exception("%s: could not flush health signals", self.group)
        broker_gone = code == EXIT_BROKER_LOST or self.broker_down
        self.publisher.flush(2.0 if broker_gone else None)
        # close() leaves the group; with the broker gone it can only wait for its own
        # request timeouts (socket.timeout.ms), so it runs on a watchdog thread and
        # the process may exit past it — the socket dies with the process.
        closer = threading.Thread(
            target=self._consumer.close, name=f"close-{self.group}", daemon=True
        )
        closer.start()
        closer.join(self.settings.shutdown_timeout_s)
        if closer.is_alive():
            log.warning(
                "%s: consumer close still waiting on the broker after %.0fs",
                self.group,
                self.settings.shutdown_timeout_s,
            )
        log.info("%s: consumer closed (exit %d)", self.group, code)

    # --- rebalance: DuckDB holds the truth about where to resume -------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self.store.transaction() as con:
            stored = tables.stored_offsets(con, self.group)
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self.ready.set()
        log.info("%s: assigned %d partitions", self.group, len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are written before the next poll, so nothing is pending here.
        consumer.unassign()

    # --- broker loss ---------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        lost = err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)
        if lost and self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
            self._next_probe = self._broker_down_since + self._probe_delay
            log.warning("%s: broker unreachable: %s", self.group, err.str())

    @property
    def broker_down(self) -> bool:
        return self._broker_down_since is not None

    def _broker_still_down(self) -> bool:
        """Probe with backoff; True once the outage outlasted the grace period."""
        assert self._broker_down_since is not None
        t = time.monotonic()
        if t >= self._next_probe:
            try:
                self._consumer.list_topics(timeout=1.0)
                log.info("%s: broker reachable again", self.group)
                self._broker_down_since = None
                self._probe_delay = 0.5
                return False
            except KafkaException:
                self._probe_delay = min(self._probe_delay * 2, 5.0)
                self._next_probe = time.monotonic() + self._probe_delay
        if time.monotonic() - self._broker_down_since > self.settings.broker_grace_s:
            log.error(
                "%s: broker unreachable for more than %.0fs; shutting down",
                self.group,
                self.settings.broker_grace_s,
            )
            self._record_broker_lost()
            return True
        return False

    def _record_broker_lost(self) -> None:
        with self.store.transaction() as con:
            tables.insert(con, "health_signals", [self._signal("broker_reachable", 0.0)])

    # --- the batch ---------------------------------------------------------------------

    def process(self, messages: list[Any]) -> None:
        records = [self._record(m) for m in messages if self._is_data(m)]
        if not records:
            return
        outputs, dead = self._handle(records)
        try:
            self._write(records, outputs, dead)
        except Exception:
            # One record's rows broke the batch (e.g. a constraint): find it, one by one.
            log.exception("%s: batch write failed; isolating the bad record", self.group)
            self._write_one_by_one(records, outputs, dead)
        self.stats.batches += 1
        self.stats.total_processed += len(records)

    def _is_data(self, msg: Any) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("%s: consume error: %s", self.group, err.str())
        return False

    @staticmethod
    def _record(msg: Any) -> Record:
        _, ts = msg.timestamp()
        record = Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts)
        try:
            record.event = decode(record.value)
        except EventDecodeError as exc:
            record.error = exc
        return record

    def _handle(self, records: list[Record]) -> tuple[dict[int, Output], list[DeadLetter]]:
        outputs: dict[int, Output] = {}
        dead: list[DeadLetter] = []
        for i, record in enumerate(records):
            self.stats.processed += 1
            try:
                if record.error is not None:
                    dead.append(
                        DeadLetter(
                            record, f"EventDecodeError.{record.error.kind}", safe_text(record.error)
                        )
                    )
                    outputs[i] = self.handler.handle_invalid(record)
                else:
                    outputs[i] = self.handler.handle(record)
            except Exception as exc:  # any handler bug: dead-letter this record, go on
                self.stats.errors += 1
                log.warning(
                    "%s: handler error at %s[%d]@%d: %r",
                    self.group,
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                dead.append(
                    DeadLetter(record, type(exc).__name__, safe_text(str(exc) or repr(exc)))
                )
        self.stats.dead_letters += len(dead)
        return outputs, dead

    def _write(
        self, records: list[Record], outputs: dict[int, Output], dead: list[DeadLetter]
    ) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        for r in records:
            next_offsets[(r.topic, r.partition)] = r.offset + 1
        self._send_dead_letters(dead)
        signals = self._take_signals()

        def write(con: Any) -> Rows:
            # Fencing: a member that lost its partitions without noticing (a zombie after
            # a session timeout) may hold a batch another member already stored. Anything
            # below the stored offsets is dropped here, for every table at once.
            stored = tables.stored_offsets(con, self.group)
            fresh = [
                i
                for i, r in enumerate(records)
                if r.offset >= stored.get((r.topic, r.partition), -1)
            ]
            rows = Rows()
            for i in fresh:
                rows.extend(outputs.get(i, []))
            kept = {id(records[i]) for i in fresh}
            self.handler.persist(con, rows)
            tables.insert(
                con, "dead_letters", [self._dead_row(d) for d in dead if id(d.record) in kept]
            )
            tables.insert(con, "health_signals", signals)
            tables.save_offsets(
                con,
                self.group,
                {tp: max(o, stored.get(tp, 0)) for tp, o in next_offsets.items()},
            )
            return rows

        # Groups commit side by side (MVCC); a write-write conflict retries the batch.
        rows = self.store.write(write)
        self._commit_to_kafka(next_offsets)
        self.handler.after_commit(rows)

    def _write_one_by_one(
        self, records: list[Record], outputs: dict[int, Output], dead: list[DeadLetter]
    ) -> None:
        dead_by_record = {id(d.record): d for d in dead}
        for i, record in enumerate(records):
            out = outputs.get(i, [])
            letters = [dead_by_record[id(record)]] if id(record) in dead_by_record else []
            try:
                self._write([record], {0: out}, letters)
            except Exception as exc:
                self.stats.errors += 1
                self.stats.dead_letters += 1
                letter = DeadLetter(record, type(exc).__name__, f"store rejected rows: {exc}")
                self._write([record], {}, [letter])

    # --- side outputs --------------------------------------------------------------------

    def _send_dead_letters(self, dead: list[DeadLetter]) -> None:
        if not dead:
            return
        for d in dead:
            r = d.record
            headers = [
                ("error_class", d.error_class.encode()),
                ("error_message", d.error_message.encode()[:1000]),
                ("original_topic", r.topic.encode()),
                ("original_partition", str(r.partition).encode()),
                ("original_offset", str(r.offset).encode()),
                ("consumer_group", self.group.encode()),
            ]
            value = r.value or b""
            if len(value) > DLQ_MAX_VALUE_BYTES:
                # Kafka accepted it once, but our producer's limit may be lower: keep the
                # head here (dead_letters keeps every byte) rather than fail the batch.
                headers += [("truncated_from", str(len(value)).encode())]
                value = value[:DLQ_MAX_VALUE_BYTES]
            try:
                self.publisher.send_async(
                    self.settings.topic_dlq, value, key=r.key, headers=headers
                )
            except KafkaException as exc:
                log.error(
                    "%s: dead letter %s[%d]@%d not sent to the DLQ topic (%s); it is "
                    "still stored in dead_letters",
                    self.group,
                    r.topic,
                    r.partition,
                    r.offset,
                    exc,
                )
        # At-least-once into the DLQ topic (its headers identify duplicates); the
        # dead_letters table is exactly-once with the batch.
        remaining = self.publisher.flush(5.0)
        if remaining:
            log.warning("%s: %d dead letters not yet acknowledged by Kafka", self.group, remaining)

    def _dead_row(self, d: DeadLetter) -> dict[str, Any]:
        r = d.record
        return {
            "consumer_group": self.group,
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "error_class": d.error_class,
            "error_message": d.error_message,
            "raw": r.value,
            "key": r.key,
            "received_at": now(),
        }

    def _commit_to_kafka(self, next_offsets: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # informational only: DuckDB holds the truth
            log.debug("%s: Kafka commit failed: %s", self.group, exc)

    def _signal(self, metric: str, value: float) -> dict[str, Any]:
        return {
            "observed_at": now(),
            "source": f"consumer:{self._client_id}",
            "consumer_group": self.group,
            "topic": None,
            "partition": None,
            "metric": metric,
            "value": float(value),
        }

    def _take_signals(self, force: bool = False) -> list[dict[str, Any]]:
        if not force and time.monotonic() - self.stats.last_flush < SIGNAL_INTERVAL_S:
            return []
        counts = self.stats.take()
        if not any(counts.values()):
            return []
        return [self._signal(k, v) for k, v in counts.items()]

    def _maybe_flush_signals(self, force: bool = False) -> None:
        signals = self._take_signals(force)
        if signals:
            with self.store.transaction() as con:
                tables.insert(con, "health_signals", signals)
