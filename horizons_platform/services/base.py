"""Column builders the services share (the loop's contract is kafka/records.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from horizons_platform.kafka.records import Batch, Columns, reused_reason
from horizons_platform.store import tables
from horizons_platform.store.sql import literal
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


def reused_in_store(
    con: Any,
    batch: Batch,
    wanted: dict[str, list[int]],
    query: str,
    differs: Callable[[Any, tuple[Any, ...]], str | None],
) -> dict[int, str]:
    """Records (``wanted``: key → indices) whose key a table holds for another event.
    ``query`` selects the key first, then what ``differs`` compares, for ``{keys}``;
    ``differs`` returns where the key was used, or None for the same event again."""
    if not wanted:
        return {}
    stored = con.execute(query.format(keys=", ".join(literal(k) for k in wanted))).fetchall()
    out: dict[int, str] = {}
    for key, *values in stored:
        for i in wanted[key]:
            event: Any = batch.events[i]
            where = differs(event, tuple(values))
            if where is not None:
                out[i] = reused_reason(event["event_id"], where)
    return out


def stored_elsewhere(con: Any, batch: Batch, skip: dict[int, str]) -> dict[int, str]:
    """Records of ``batch`` whose event id ``job_events`` holds for another event (one of
    IDENTITY differs): the id was reused, not replayed."""
    wanted: dict[str, list[int]] = {}
    for i, valid in enumerate(batch.events):
        if valid is not None and i not in skip:
            wanted.setdefault(valid["event_id"], []).append(i)

    def differs(e: Any, stored: tuple[Any, ...]) -> str | None:
        same = (e["event_type"], e["job_id"], e["occurred_at"], tables.to_json(e["payload"]))
        return None if same == stored[:4] else f"{stored[4]}[{stored[5]}]@{stored[6]}"

    return reused_in_store(
        con,
        batch,
        wanted,
        "SELECT event_id, event_type, job_id, occurred_at, payload::VARCHAR, topic, "
        '"partition", "offset" FROM job_events WHERE event_id IN ({keys})',
        differs,
    )
