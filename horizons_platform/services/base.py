"""Column builders the services share (the loop's contract is kafka/records.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from horizons_platform.kafka.records import Batch, Columns
from horizons_platform.store import tables
from horizons_platform.tracing import trace_id_of


def rows_to_columns(rows: list[dict[str, Any]]) -> Columns:
    """Columns of rows that all have the same keys."""
    if not rows:
        return {}
    return {name: [row[name] for row in rows] for name in rows[0]}


def job_event_columns(batch: Batch, indices: list[int], ingested_at: datetime) -> Columns:
    """The ``job_events`` columns of the valid events ``indices``."""
    events: list[Any] = [batch.events[i] for i in indices]
    return {
        "event_id": [e["event_id"] for e in events],
        "event_type": [e["event_type"] for e in events],
        "job_id": [e["job_id"] for e in events],
        "occurred_at": [e["occurred_at"] for e in events],
        "producer": [e["producer"] for e in events],
        "schema_version": [e["schema_version"] for e in events],
        "trace_id": [trace_id_of(e["trace_id"]) for e in events],
        "payload": [tables.to_json(e["payload"]) for e in events],
        "topic": [batch.topics[i] for i in indices],
        "partition": [batch.partitions[i] for i in indices],
        "offset": [batch.offsets[i] for i in indices],
        "ingested_at": [ingested_at] * len(indices),
    }
