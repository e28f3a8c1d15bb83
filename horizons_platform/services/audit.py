"""ComplianceAuditor: an immutable, hash-chained record of every event seen.

Each ``audit_log`` row carries ``hash = SHA-256(prev_hash || canonical content)``; the
canonical content covers seq, event_id, job_id, event_type, occurred_at, payload and,
for an invalid event, a digest of its raw bytes. Editing, deleting or reordering any
row therefore breaks the chain from that row on. Retention removes old rows and writes
a checkpoint naming the removed seq ranges, so the rest still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from horizons_platform.services.base import Handler, Output, Record, Rows, now
from horizons_platform.store import tables

if TYPE_CHECKING:
    import duckdb

GENESIS = "0" * 64
AUDIT_COLUMNS = (
    "seq",
    "event_id",
    "job_id",
    "event_type",
    "occurred_at",
    "payload",
    "raw",
    "valid",
    "prev_hash",
    "hash",
)


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_payload(payload: Any) -> Any:
    if payload is None:
        return None
    value = json.loads(payload) if isinstance(payload, str | bytes) else payload
    return value


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes the hash covers; stable across DuckDB round trips."""
    raw = row.get("raw")
    content = {
        "seq": row["seq"],
        "event_id": row.get("event_id"),
        "job_id": row.get("job_id"),
        "event_type": row.get("event_type"),
        "occurred_at": _iso(row.get("occurred_at")),
        "payload": _canonical_payload(row.get("payload")),
        "raw_sha256": hashlib.sha256(raw).hexdigest() if raw is not None else None,
        "valid": bool(row.get("valid", True)),
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str).encode()


def link(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()


def chain(rows: list[dict[str, Any]], last_seq: int, last_hash: str | None) -> None:
    """Assign seq, prev_hash and hash to new rows in place, continuing the chain."""
    prev = last_hash or GENESIS
    for i, row in enumerate(rows, start=1):
        row["seq"] = last_seq + i
        row["prev_hash"] = prev
        row["hash"] = prev = link(prev, row)


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def removed_seqs(checkpoints: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for cp in checkpoints:
        raw = cp.get("removed_ranges")
        for lo, hi in json.loads(raw) if isinstance(raw, str) else raw or []:
            ranges.append((int(lo), int(hi)))
    return sorted(ranges)


def _covered(lo: int, hi: int, ranges: list[tuple[int, int]]) -> bool:
    """Is every seq in [lo, hi] inside a removed range?"""
    want = lo
    for a, b in ranges:
        if a <= want <= b:
            want = b + 1
        if want > hi:
            return True
    return want > hi


def verify(
    rows: Iterable[dict[str, Any]], checkpoints: Iterable[dict[str, Any]] = ()
) -> ChainReport:
    """Recompute the chain over rows in seq order; name the first row that breaks it.

    A gap in seq is legitimate only where a retention checkpoint recorded removing
    exactly those seqs; across such a gap the next row's prev_hash cannot be recomputed,
    but its own hash still covers it.
    """
    ranges = removed_seqs(checkpoints)
    prev_seq = 0
    prev_hash = GENESIS
    checked = 0
    for row in rows:
        seq = int(row["seq"])
        if seq != prev_seq + 1:
            if not _covered(prev_seq + 1, seq - 1, ranges):
                return ChainReport(False, checked, seq, f"seq {prev_seq + 1}..{seq - 1} missing")
        elif row["prev_hash"] != prev_hash:
            return ChainReport(False, checked, seq, "prev_hash does not match the previous row")
        if link(row["prev_hash"], row) != row["hash"]:
            return ChainReport(False, checked, seq, "content does not match its hash")
        prev_seq, prev_hash = seq, row["hash"]
        checked += 1
    return ChainReport(True, checked)


def audit_row(record: Record) -> dict[str, Any]:
    event = record.event
    base: dict[str, Any] = {
        "recorded_at": now(),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
    }
    if event is not None:
        base.update(
            event_id=str(event.event_id),
            job_id=event.job_id,
            event_type=event.event_type,
            occurred_at=event.occurred_at,
            valid=True,
            validation_error=None,
            payload=event.payload.model_dump_json(),  # type: ignore[attr-defined]
            raw=None,
        )
    else:
        hint = _best_effort_fields(record.value)
        base.update(
            event_id=hint.get("event_id"),
            job_id=hint.get("job_id"),
            event_type=hint.get("event_type"),
            occurred_at=None,
            valid=False,
            validation_error=safe_text(record.error),
            payload=None,
            raw=record.value or b"",
        )
    return base


def safe_text(value: object, limit: int = 1000) -> str:
    """Text that any UTF-8 store accepts: JSON may carry lone surrogates (\\ud800)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _best_effort_fields(raw: bytes | None) -> dict[str, str]:
    """Identifying fields of an invalid event, when its JSON is readable at all."""
    try:
        data = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):  # hostile input: deep nesting
        return {}
    if not isinstance(data, dict):
        return {}
    fields = ("event_id", "job_id", "event_type")
    return {k: safe_text(data[k], 200) for k in fields if data.get(k)}


class AuditHandler(Handler):
    group = "compliance-auditor"

    def topics(self) -> list[str]:
        s = self.settings
        return [
            s.topic_job_lifecycle,
            s.topic_job_metrics,
            s.topic_audit_trail,
            s.topic_system_health,
        ]

    def handle(self, record: Record) -> Output:
        return [("audit_log", audit_row(record))]

    def handle_invalid(self, record: Record) -> Output:
        return [("audit_log", audit_row(record))]

    def persist(self, con: duckdb.DuckDBPyConnection, rows: Rows) -> None:
        # Replays never reach this point: the loop fences on the stored offsets, and the
        # UNIQUE (topic, partition, offset) constraint is the last line of defence.
        new = rows.tables.pop("audit_log", [])
        # The chain is extended inside the write transaction: DuckDB's single-writer
        # lock makes the tail we read here the true tail, even with several auditors.
        last_seq, last_hash = tables.audit_tail(con)
        chain(new, last_seq, last_hash)
        tables.insert(con, "audit_log", new)
        super().persist(con, rows)


def iter_rows(con: duckdb.DuckDBPyConnection, batch: int = 50_000) -> Iterator[dict[str, Any]]:
    cur = con.execute(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log ORDER BY seq")
    while chunk := cur.fetchmany(batch):
        for values in chunk:
            yield dict(zip(AUDIT_COLUMNS, values, strict=True))


def verify_store(con: duckdb.DuckDBPyConnection) -> ChainReport:
    cps = con.execute("SELECT removed_ranges FROM audit_checkpoints").fetchall()
    return verify(iter_rows(con), [{"removed_ranges": c[0]} for c in cps])
