"""One batch made durable: the handler's rows, the dead letters and the group's next
offsets in ONE store transaction (quix-streams' Checkpoint, for one batch at a time).

No Kafka in here — dead letters leave through a callback — so fencing and the
one-by-one isolation of a bad record are unit-tested against a DuckDB file alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb

from horizons_platform.events import EventDecodeError, safe_text
from horizons_platform.kafka.records import Batch, Handler, Tables, now
from horizons_platform.store import tables
from horizons_platform.store.base import STORE_ERRORS, StoreBase
from horizons_platform.tracing import trace_id_of

log = logging.getLogger(__name__)


class _SlowPath(Exception):
    """The one-statement offset update found a partition it cannot simply advance."""


@dataclass(slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error_class: str
    error_message: str


@dataclass
class Counters:
    """What the health rules read (flushed to ``health_signals`` about once a second)."""

    processed: int = 0
    errors: int = 0
    dead_letters: int = 0

    def take(self) -> dict[str, int]:
        out = {
            "processed": self.processed,
            "errors": self.errors,
            "dead_letters": self.dead_letters,
        }
        self.processed = self.errors = self.dead_letters = 0
        return out


@dataclass
class Checkpoint:
    handler: Handler
    store: StoreBase
    # Sends dead letters to the DLQ topic before their transaction (at-least-once there;
    # the dead_letters table is exactly-once with the batch).
    send_dead_letters: Callable[[list[DeadLetter]], None] = lambda letters: None
    # Extra rows for the same transaction (the loop's health signals), taken per write.
    extra_rows: Callable[[], Tables] = dict
    counters: Counters = field(default_factory=Counters)
    # The Kafka cluster the offsets belong to (set by the loop once it checked them).
    cluster_id: str | None = None
    fenced: int = 0  # records dropped as already stored (the loop then rechecks offsets)
    # Dead letters already handed to send_dead_letters for this batch (see _write), over
    # every commit() of it: the loop calls commit() again while a store failure lasts.
    _letters_sent: set[tuple[str, int, int]] = field(default_factory=set)
    _batch: Batch | None = None

    @property
    def group(self) -> str:
        return self.handler.group

    def prepare(self, batch: Batch) -> Tables | None:
        """The handler's rows for ``batch`` (None: the handler raised; :meth:`commit`
        then isolates the record). Runs on the polling thread."""
        try:
            rows = self.handler.handle(batch)
            self.handler.prepare(rows)
        except Exception as exc:
            log.warning("%s: handler failed on a batch (%r); isolating the record", self.group, exc)
            return None
        return rows

    def commit(self, batch: Batch, rows: Tables | None = None) -> dict[tuple[str, int], int]:
        """Store ``batch`` (with the rows :meth:`prepare` made, or made here); returns the
        next offsets to commit to Kafka. Only a store failure that is not about one record
        escapes (the batch is then not stored)."""
        if batch is not self._batch:  # not a retry of the same batch (the loop retries
            # a failing store): its letters were sent, its records counted, once already
            self._batch = batch
            self.counters.processed += len(batch)
            self._letters_sent = set()
        if rows is None:
            rows = self.prepare(batch)
        if rows is None:
            self._isolate(batch)
            return batch.next_offsets()
        letters = [self._invalid(batch, i) for i in sorted(batch.errors)]
        try:
            self._write(batch, rows, letters)
        except Exception as exc:
            if is_store_failure(exc):
                raise
            # One record's rows broke the batch (a constraint, a value the store refuses):
            # find it.
            log.warning("%s: batch write failed (%r); isolating the record", self.group, exc)
            self._isolate(batch)
        return batch.next_offsets()

    # --- the transaction -------------------------------------------------------------------

    def _write(self, batch: Batch, rows: Tables, letters: list[DeadLetter]) -> None:
        self._send_once(letters)
        spans = batch.spans()
        next_offsets = {tp: last + 1 for tp, (_, last) in spans.items()}
        extra = self.extra_rows()

        dedupe = False  # first without ON CONFLICT: replays of a stored key are rare

        def work(con: Any) -> None:
            # The usual case in one statement: every partition's stored offset is at or
            # below the batch's first record, and moves to the batch's end.
            if not tables.advance_offsets(con, self.group, spans):
                raise _SlowPath
            self.handler.persist(con, dict(rows), dedupe=dedupe)
            tables.insert(con, "dead_letters", [self._dead_row(d) for d in letters])
            for table, columns in extra.items():
                tables.insert_columns(con, table, columns)

        def fenced_work(con: Any) -> None:
            # Fencing: a member that lost its partitions without noticing (a zombie after
            # a session timeout) may hold a batch another member already stored. Anything
            # below the stored offsets is dropped here, for every table at once. (Also
            # the way in for a partition the store has no offset for yet.)
            stored = tables.stored_offsets(con, self.group)
            fresh = [
                i
                for i, tp in enumerate(zip(batch.topics, batch.partitions, strict=True))
                if batch.offsets[i] >= stored.get(tp, -1)
            ]
            if len(fresh) < len(batch):
                log.warning(
                    "%s: fenced %d records already stored by another member",
                    self.group,
                    len(batch) - len(fresh),
                )
                self.fenced += len(batch) - len(fresh)
                sub = batch.take(fresh)
                self.handler.persist(con, self.handler.handle(sub) if fresh else {})
                kept = set(zip(sub.topics, sub.partitions, sub.offsets, strict=True))
                live = [d for d in letters if (d.topic, d.partition, d.offset) in kept]
            else:
                self.handler.persist(con, dict(rows))
                live = letters
            tables.insert(con, "dead_letters", [self._dead_row(d) for d in live])
            for table, columns in extra.items():
                tables.insert_columns(con, table, columns)
            tables.save_offsets(
                con,
                self.group,
                {tp: max(o, stored.get(tp, 0)) for tp, o in next_offsets.items()},
                self.cluster_id,
            )

        try:
            # Groups commit side by side (MVCC); a write-write conflict retries the batch.
            try:
                self.store.write(work)
            except _SlowPath:
                self.handler.rollback()
                self.store.write(fenced_work)
            except duckdb.ConstraintException as exc:
                if not tables.is_duplicate_key(exc):
                    raise
                # An event stored before (re-published, replayed): the same batch again,
                # skipping the keys that exist — except an id that came back with other
                # content, which is no replay: that record is dead-lettered, not dropped.
                self.handler.rollback()
                with self.store.reader() as con, tables.optimized(con):
                    reused = self.handler.reused_ids(con, batch)
                if reused:
                    for i, reason in reused.items():
                        batch.events[i] = None
                        batch.errors[i] = EventDecodeError(safe_text(reason), kind="reused")
                    rows = self.handler.handle(batch)
                    fresh = [self._invalid(batch, i) for i in sorted(reused)]
                    self._send_once(fresh)
                    letters = letters + fresh
                    self.counters.errors += len(reused)
                dedupe = True
                self.store.write(work)
        except BaseException:
            self.handler.rollback()
            raise
        self.counters.dead_letters += len(letters)
        self.handler.after_commit(rows)

    def _send_once(self, letters: list[DeadLetter]) -> None:
        """To the DLQ topic, before their transaction, each letter once per commit()
        however often isolating a bad record writes its part of the batch again
        (at-least-once only across a crash: 18,198 messages for 12,136 letters once)."""
        unsent = [d for d in letters if (d.topic, d.partition, d.offset) not in self._letters_sent]
        self.send_dead_letters(unsent)
        self._letters_sent.update((d.topic, d.partition, d.offset) for d in unsent)

    def _isolate(self, batch: Batch) -> None:
        """Store ``batch`` whose handling or writing failed, dead-lettering the records
        that cannot be stored: halves that go through are written as they are, and only
        a failing half is halved again, down to its one record. A bad record among n
        costs ~2·log2(n) transactions, not n (3,000 garbage messages beside one record
        the store refused once stalled two groups for minutes, one transaction each)."""
        if len(batch) == 1:
            self._one(batch)
            return
        mid = len(batch) // 2
        for part in (batch.take(list(range(mid))), batch.take(list(range(mid, len(batch))))):
            try:
                rows = self.handler.handle(part)
            except Exception:  # a handler bug in this half: look closer
                self._isolate(part)
                continue
            letters = [self._invalid(part, i) for i in sorted(part.errors)]
            try:
                self._write(part, rows, letters)
            except Exception as exc:
                if is_store_failure(exc):
                    raise
                self._isolate(part)

    def _one(self, one: Batch) -> None:
        """One record: stored, or dead-lettered with the reason it cannot be."""
        letters = [self._invalid(one, 0)] if one.errors else []
        try:
            rows = self.handler.handle(one)
        except Exception as exc:  # a handler bug: dead-letter this record, go on
            self.counters.errors += 1
            log.warning(
                "%s: handler error at %s[%d]@%d: %r",
                self.group,
                one.topics[0],
                one.partitions[0],
                one.offsets[0],
                exc,
                extra=_record_fields(one),
            )
            self._write(one, {}, [_letter(one, type(exc).__name__, str(exc) or repr(exc))])
            return
        try:
            self._write(one, rows, letters)
        except Exception as exc:
            if is_store_failure(exc):
                raise
            # The store refuses this record's rows: it is invalid after all. The
            # handler sees it as such (the auditor still records it, flagged).
            self.counters.errors += 1
            reason = f"store rejected rows: {exc}"
            one.events[0] = None
            one.errors[0] = EventDecodeError(safe_text(reason), kind="rejected")
            letter = _letter(one, type(exc).__name__, reason)
            try:
                self._write(one, self.handler.handle(one), [letter])
            except Exception as again:
                if is_store_failure(again):
                    raise
                self._write(one, {}, [letter])

    # --- dead letters ----------------------------------------------------------------------

    @staticmethod
    def _invalid(batch: Batch, i: int) -> DeadLetter:
        error = batch.errors[i]
        return _letter(batch.take([i]), f"EventDecodeError.{error.kind}", str(error))

    def _dead_row(self, d: DeadLetter) -> dict[str, Any]:
        return {
            "consumer_group": self.group,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "error_class": d.error_class,
            "error_message": d.error_message,
            "raw": d.value,
            "key": d.key,
            "received_at": now(),
            "cluster_id": self.cluster_id or "",
        }


def _record_fields(one: Batch) -> dict[str, Any]:
    """The record's coordinates, event id and trace id for a log line (JSON logs)."""
    event = one.events[0] if one.events else None
    return {
        "topic": one.topics[0],
        "partition": one.partitions[0],
        "offset": one.offsets[0],
        "event_id": event["event_id"] if event else None,
        "trace_id": trace_id_of(event["trace_id"]) if event else None,
    }


def _letter(one: Batch, error_class: str, message: str) -> DeadLetter:
    return DeadLetter(
        one.topics[0],
        one.partitions[0],
        one.offsets[0],
        one.keys[0],
        one.values[0],
        error_class,
        safe_text(message),
    )


class StoreFailed(RuntimeError):
    """The store kept failing past ``store_retry_s``: the consumer stops, uncommitted."""


class BatchAbandoned(RuntimeError):
    """Asked to stop while another transaction still held the batch's rows: nothing of it
    is stored or committed, and it is read again at the next start."""


def is_store_failure(exc: BaseException) -> bool:
    """A failure of the store itself (I/O — a WAL the disk refuses surfaces as a failed
    commit —, memory, a lost connection, a database DuckDB invalidated), not of one
    record: never dead-lettered, the batch is not stored. A write conflict that outlasted
    StoreBase.write's retries is one too: another transaction holds the rows (a client's
    long or abandoned write transaction), which no record of the batch can cause."""
    return isinstance(exc, (*STORE_ERRORS, StoreFailed, duckdb.TransactionException))
