"""What a service is to the consumer loop: a handler from records to rows.

A handler is pure: it turns one decoded record into rows for tables (or raises, which
dead-letters that record). The one consumer loop does all the I/O — polling, the DuckDB
transaction that stores rows and offsets together, the dead-letter topic — for all four.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from horizons_platform.events import Envelope, EventDecodeError
from horizons_platform.store import tables

if TYPE_CHECKING:
    import duckdb

    from horizons_platform.settings import Settings


@dataclass(slots=True)
class Record:
    """One Kafka message as the loop hands it over: coordinates, bytes, decoded event."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    event: Envelope | None = None
    error: EventDecodeError | None = None


@dataclass
class Rows:
    """Rows a batch wants written, per table, in arrival order."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.tables[table].append(row)

    def extend(self, other: list[tuple[str, dict[str, Any]]]) -> None:
        for table, row in other:
            self.tables[table].append(row)

    def count(self) -> int:
        return sum(len(v) for v in self.tables.values())


Output = list[tuple[str, dict[str, Any]]]


class Handler:
    """Base class of the four services. Subclasses set ``group`` and override ``handle``."""

    group: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def topics(self) -> list[str]:
        raise NotImplementedError

    def handle(self, record: Record) -> Output:
        """Rows for one valid event. Raising dead-letters the record; the loop goes on."""
        raise NotImplementedError

    def handle_invalid(self, record: Record) -> Output:
        """Rows for a record that failed decoding (it is dead-lettered regardless)."""
        return []

    def persist(self, con: duckdb.DuckDBPyConnection, rows: Rows) -> None:
        """Write the batch's rows inside the loop's transaction."""
        for table, batch in rows.tables.items():
            if table == "jobs":
                tables.upsert_jobs(con, batch)
            else:
                tables.insert(con, table, batch)

    def after_commit(self, rows: Rows) -> None:
        """Called after the batch is durable (e.g. to wake a dispatcher)."""


def now() -> datetime:
    return datetime.now(UTC)


def event_row(record: Record, event: Envelope) -> dict[str, Any]:
    """The ``job_events`` row of a valid event."""
    return {
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "job_id": event.job_id,
        "occurred_at": event.occurred_at,
        "producer": event.producer,
        "schema_version": event.schema_version,
        "trace_id": event.trace_id,
        "payload": event.payload.model_dump_json(),  # type: ignore[attr-defined]
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "ingested_at": now(),
    }
