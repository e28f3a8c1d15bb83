"""Bulk writes and the few reads the consumers need, all through Arrow.

Rows arrive as columns (the consumers' batches) or as lists of dicts (everyone else);
they become one Arrow table and one ``INSERT … SELECT`` — never row-by-row inserts on
the hot path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa
from pydantic_core import to_json as _to_json

from horizons_platform.events import JOB_STATUS_RANK, Envelope, encode, headers_for
from horizons_platform.store.sql import literal

# Primary/unique key per table; an insert that meets an existing key is a no-op, which
# makes every replay of an already-stored event harmless.
# (audit_log is not here: its seq is assigned inside the write transaction, and an
# ON CONFLICT check against its composite UNIQUE index costs ~50 µs a row; a violation
# raises instead, and the loop isolates the offending record.)
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "job_events": ("event_id",),
    "job_metrics": ("event_id",),
    "notifications": ("notification_id",),
    "notification_queue": ("notification_id",),
    "health_alerts": ("alert_id",),
    "dead_letters": ("consumer_group", "cluster_id", "topic", "partition", "offset"),
    "health_signals": (),
    "publications": ("publication_id",),
}


def _q(column: str) -> str:
    return f'"{column}"'


def to_json(value: Any) -> str:
    """JSON text of a decoded value (a payload), as pydantic validated it."""
    return _to_json(value).decode()


def publication_row(topic: str, event: Envelope, key: str | None = None) -> dict[str, Any]:
    """A ``publications`` row (runtime/publications.py): ``event`` waiting for Kafka."""
    return {
        "publication_id": str(event.event_id),
        "topic": topic,
        "key": key if key is not None else event.job_id,
        "value": encode(event).decode(),
        "headers": json.dumps([[k, v.decode()] for k, v in headers_for(event)]),
        "created_at": datetime.now(UTC),
        "attempts": 0,
        "last_error": None,
    }


def insert_columns(
    con: duckdb.DuckDBPyConnection,
    table: str,
    columns: dict[str, list[Any]],
    *,
    dedupe: bool = True,
) -> int:
    """Insert columns (equal-length lists); existing keys are skipped — or, with
    ``dedupe=False``, raise ConstraintException (the caller retries with dedupe): DuckDB's
    ON CONFLICT check costs ~40 µs a row, more than the insert itself."""
    arrow = pa.table(columns)
    if not arrow.num_rows:
        return 0
    return _insert_arrow(con, table, arrow, dedupe)


def scan_once(arrow: pa.Table) -> Any:
    """``arrow`` as a bare Arrow C stream (a PyCapsule), for ONE statement to read by
    its variable's name (a replacement scan).

    Handed a pyarrow Table, DuckDB's Python client builds a ``pyarrow.dataset`` Scanner,
    with the GIL held, for a projection pushdown these inserts never use: ~0.4 ms of
    every small ``INSERT … SELECT`` (100 rows: 1.2 → 0.8 ms, DuckDB 1.5.5). A capsule is
    read as it is. It can be read once: each statement needs its own."""
    return arrow.__arrow_c_stream__()


def is_duplicate_key(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.ConstraintException) and "Duplicate key" in str(exc)


def _insert_arrow(
    con: duckdb.DuckDBPyConnection, table: str, arrow: pa.Table, dedupe: bool = True
) -> int:
    conflict = " ON CONFLICT DO NOTHING" if dedupe and TABLE_KEYS.get(table) else ""
    cols = ", ".join(_q(c) for c in arrow.column_names)
    # DuckDB finds the local Arrow stream by its name (a replacement scan): ~0.5 ms less
    # per statement than register()/unregister(), which matters at 50-row batches.
    horizons_rows = scan_once(arrow)  # noqa: F841
    con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM horizons_rows{conflict}")
    return arrow.num_rows


def insert(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[dict[str, Any]]) -> int:
    """Insert ``rows`` (all with the same keys); existing keys are skipped."""
    if not rows:
        return 0
    conflict = " ON CONFLICT DO NOTHING" if TABLE_KEYS.get(table) else ""
    if hasattr(con, "insert_rows"):  # a client of the owner: no Arrow over Quack 1.5.5
        columns = list(rows[0])
        con.insert_rows(table, columns, [[r[c] for c in columns] for r in rows], conflict)
        return len(rows)
    return _insert_arrow(con, table, pa.Table.from_pylist(list(rows)))


_JOB_COLUMNS = (
    "job_id",
    "status",
    "owner",
    "job_type",
    "submitted_at",
    "started_at",
    "finished_at",
    "duration_s",
    "queue_time_s",
    "last_event_id",
    "updated_at",
    "trace_id",
)


def fold_job_updates(updates: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge several updates of one job (in order) into one row per job.

    DuckDB refuses to update one row twice in a single ``ON CONFLICT DO UPDATE``.
    """
    merged: dict[str, dict[str, Any]] = {}
    for update in updates:
        row = merged.get(update["job_id"])
        if row is None:
            merged[update["job_id"]] = row = dict.fromkeys(_JOB_COLUMNS)
        elif _rank(update["status"]) <= _rank(row["status"]):
            # Not further along (a duplicate, or late): it may fill gaps, never overwrite.
            for key, value in update.items():
                if row[key] is None:
                    row[key] = value
            continue
        for key, value in update.items():
            if value is not None:
                row[key] = value
    for row in merged.values():
        # When the batch itself holds both ends, the durations are known right here.
        if row["started_at"] and row["finished_at"]:
            row["duration_s"] = (row["finished_at"] - row["started_at"]).total_seconds()
        if row["submitted_at"] and row["started_at"]:
            row["queue_time_s"] = (row["started_at"] - row["submitted_at"]).total_seconds()
    return list(merged.values())


def _rank(status: str | None) -> int:
    return -1 if status is None else JOB_STATUS_RANK.get(status, -1)


# A job's status as a rank in SQL (the same order as JOB_STATUS_RANK).
_RANK_SQL = (
    "CASE {col} "
    + " ".join(f"WHEN '{status}' THEN {rank}" for status, rank in JOB_STATUS_RANK.items())
    + " ELSE -1 END"
)


def upsert_jobs(con: duckdb.DuckDBPyConnection, columns: dict[str, list[Any]]) -> int:
    """Upsert jobs given as columns with one row per job (see :func:`fold_job_updates`)."""
    if not columns or not columns["job_id"]:
        return 0
    schema = pa.schema(
        [
            ("job_id", pa.string()),
            ("status", pa.string()),
            ("owner", pa.string()),
            ("job_type", pa.string()),
            ("submitted_at", pa.timestamp("us", tz="UTC")),
            ("started_at", pa.timestamp("us", tz="UTC")),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("duration_s", pa.float64()),
            ("queue_time_s", pa.float64()),
            ("last_event_id", pa.string()),
            ("updated_at", pa.timestamp("us", tz="UTC")),
            ("trace_id", pa.string()),
        ]
    )
    with optimized(con):  # without it, the merge's join scans the whole table (~70×)
        _upsert_jobs(con, scan_once(pa.table({n: columns[n] for n in _JOB_COLUMNS}, schema)))
    return len(columns["job_id"])


def _upsert_jobs(con: duckdb.DuckDBPyConnection, horizons_jobs: Any) -> None:
    # ``horizons_jobs`` (see scan_once) is found by name by DuckDB (a replacement scan).
    # State only moves forward: the status (and the event that set it) changes only for
    # a state further along; every other column is set once — the first value stored
    # wins, so a replayed or late event fills gaps but never rewrites. Durations are
    # derived from whichever side (batch or table) knows the start and the finish.
    # MERGE, not INSERT … ON CONFLICT DO UPDATE: the same work in 2.5× less time in
    # DuckDB 1.5.5 (4.4 against 10.8 ms for a batch's 60 jobs beside 2,000,000 stored;
    # docs/kpis.md), the jobs upsert being the largest statement of the metrics group.
    con.execute(
        """
        MERGE INTO jobs USING horizons_jobs AS excluded ON jobs.job_id = excluded.job_id
        WHEN MATCHED THEN UPDATE SET
            status = CASE WHEN {excluded_rank} > {stored_rank}
                          THEN excluded.status ELSE jobs.status END,
            owner = coalesce(jobs.owner, excluded.owner),
            job_type = coalesce(jobs.job_type, excluded.job_type),
            submitted_at = coalesce(jobs.submitted_at, excluded.submitted_at),
            started_at = coalesce(jobs.started_at, excluded.started_at),
            finished_at = coalesce(jobs.finished_at, excluded.finished_at),
            duration_s = coalesce(
                jobs.duration_s,
                epoch(coalesce(jobs.finished_at, excluded.finished_at))
                  - epoch(coalesce(jobs.started_at, excluded.started_at))),
            queue_time_s = coalesce(
                jobs.queue_time_s,
                epoch(coalesce(jobs.started_at, excluded.started_at))
                  - epoch(coalesce(jobs.submitted_at, excluded.submitted_at))),
            last_event_id = CASE WHEN {excluded_rank} > {stored_rank}
                                 THEN excluded.last_event_id ELSE jobs.last_event_id END,
            updated_at = excluded.updated_at,
            trace_id = coalesce(jobs.trace_id, excluded.trace_id)
        WHEN NOT MATCHED THEN INSERT BY NAME
        """.format(
            excluded_rank=_RANK_SQL.format(col="excluded.status"),
            stored_rank=_RANK_SQL.format(col="jobs.status"),
        )
    )


def save_offsets(
    con: duckdb.DuckDBPyConnection,
    group: str,
    next_offsets: dict[tuple[str, int], int],
    cluster_id: str | None = None,
) -> None:
    """Set the group's next offsets (and, when given, the Kafka cluster they belong to)."""
    if not next_offsets:
        return
    now = datetime.now(UTC)
    offsets = pa.Table.from_pylist(
        [
            {
                "consumer_group": group,
                "topic": t,
                "partition": p,
                "next_offset": o,
                "updated_at": now,
                "cluster_id": cluster_id,
            }
            for (t, p), o in next_offsets.items()
        ],
        schema=pa.schema(
            [
                ("consumer_group", pa.string()),
                ("topic", pa.string()),
                ("partition", pa.int32()),
                ("next_offset", pa.int64()),
                ("updated_at", pa.timestamp("us", tz="UTC")),
                ("cluster_id", pa.string()),
            ]
        ),
    )
    _horizons_offsets = scan_once(offsets)  # found by name (see scan_once)
    con.execute(
        """
        INSERT INTO consumer_offsets
            (consumer_group, topic, "partition", next_offset, updated_at, cluster_id)
        SELECT * FROM _horizons_offsets
        ON CONFLICT (consumer_group, topic, "partition") DO UPDATE SET
            next_offset = excluded.next_offset, updated_at = excluded.updated_at,
            cluster_id = coalesce(excluded.cluster_id, consumer_offsets.cluster_id)
        """
    )


def advance_offsets(
    con: duckdb.DuckDBPyConnection, group: str, spans: dict[tuple[str, int], tuple[int, int]]
) -> bool:
    """Set each partition's stored offset to ``last + 1`` of its span (first, last) — in
    one statement, the hot path's only offset bookkeeping — if the stored offset is at
    most ``first``. False when a partition has no stored offset yet or one past ``first``
    (records already stored: fencing); the transaction must then be rolled back."""
    if not spans:
        return True
    values = ", ".join(
        f"({literal(t)}, {int(p)}, {int(first)}, {int(last) + 1})"
        for (t, p), (first, last) in spans.items()
    )
    updated = con.execute(
        f"""
        UPDATE consumer_offsets AS o SET next_offset = v.next, updated_at = now()
        FROM (VALUES {values}) AS v(topic, part, first, next)
        WHERE o.consumer_group = {literal(group)} AND o.topic = v.topic
          AND o."partition" = v.part AND o.next_offset <= v.first
        RETURNING 1
        """
    ).fetchall()
    return len(updated) == len(spans)


def stored_offsets(con: duckdb.DuckDBPyConnection, group: str) -> dict[tuple[str, int], int]:
    rows = con.execute(
        'SELECT topic, "partition", next_offset FROM consumer_offsets WHERE consumer_group = ?',
        [group],
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


def stored_positions(
    con: duckdb.DuckDBPyConnection, group: str
) -> dict[tuple[str, int], tuple[int, str | None]]:
    """(next offset, Kafka cluster id) per partition of ``group``."""
    rows = con.execute(
        'SELECT topic, "partition", next_offset, cluster_id FROM consumer_offsets '
        "WHERE consumer_group = ?",
        [group],
    ).fetchall()
    return {(t, p): (o, c) for t, p, o, c in rows}


# The lean writer cursor of the calling thread, if it has one (see make_lean).
_lean = threading.local()


def make_lean(con: duckdb.DuckDBPyConnection) -> None:
    """``con`` (the calling thread's own cursor) runs its statements without DuckDB's
    optimizer: see StoreOwner.lean_writer for why."""
    con.execute("PRAGMA disable_optimizer")
    _lean.cursor_id = id(con)


@contextmanager
def optimized(con: Any) -> Iterator[None]:
    """DuckDB's optimizer on for the block, on a lean writer's cursor too: a point
    lookup needs it to use the index, ``max()`` to read the statistics instead of the
    whole column."""
    if getattr(_lean, "cursor_id", None) != id(con):
        yield
        return
    con.execute("PRAGMA enable_optimizer")
    try:
        yield
    except BaseException:
        # A statement that failed may have aborted the transaction, and DuckDB then
        # refuses every later statement in it, this PRAGMA too: raising that would hide
        # the block's own error (a write conflict became "transaction is aborted"). The
        # cursor is made lean again once the transaction is over (relean).
        try:
            con.execute("PRAGMA disable_optimizer")
        except duckdb.Error:
            _lean.stale = True
        raise
    con.execute("PRAGMA disable_optimizer")


def relean(con: Any) -> None:
    """Make ``con`` lean again if an aborted transaction refused it (see optimized)."""
    if getattr(_lean, "stale", False) and getattr(_lean, "cursor_id", None) == id(con):
        con.execute("PRAGMA disable_optimizer")
        _lean.stale = False


def audit_tail(con: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    """The last (seq, hash) of the chain, including records removed by retention."""
    with optimized(con):
        return _audit_tail(con)


def _audit_tail(con: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    # fetchall, not fetchone: duckdb 2.0 keeps a half-read result open, and the next
    # register() on this connection then fails with ResourceInUseException.
    # max(seq) reads one narrow column; the hash then comes from a primary-key lookup
    # (ORDER BY seq DESC LIMIT 1 would scan every 64-character hash).
    last = con.execute("SELECT max(seq) FROM audit_log").fetchall()[0][0]
    rows = (
        con.execute("SELECT seq, hash FROM audit_log WHERE seq = ?", [last]).fetchall()
        if last is not None
        else []
    )
    checkpoints = con.execute(
        "SELECT last_removed_seq, last_removed_hash FROM audit_checkpoints "
        "WHERE last_removed_seq IS NOT NULL ORDER BY last_removed_seq DESC LIMIT 1"
    ).fetchall()
    candidates = rows + checkpoints
    if not candidates:
        return 0, None
    seq, digest = max(candidates, key=lambda r: r[0])
    return int(seq), digest
