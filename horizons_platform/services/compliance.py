"""Retention of the audit trail and the compliance report.

Retention deletes audit records whose event is older than the retention period and
writes a checkpoint naming the removed seq ranges and the last removed hash, so the
remaining chain still verifies (see :func:`horizons_platform.services.audit.verify`).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from horizons_platform.services.audit import verify_store
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase


def _ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def run_retention(
    con: duckdb.DuckDBPyConnection, retention_days: int, now: datetime | None = None
) -> dict[str, Any]:
    """Remove expired audit records (inside the caller's transaction); returns the checkpoint."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    # Invalid events have no trustworthy occurred_at: their age is when we recorded them.
    expired = con.execute(
        "SELECT seq, hash FROM audit_log WHERE coalesce(occurred_at, recorded_at) < ? ORDER BY seq",
        [cutoff],
    ).fetchall()
    checkpoint: dict[str, Any] = {
        "checkpoint_id": str(uuid.uuid4()),
        "created_at": now,
        "cutoff": cutoff,
        "removed_count": len(expired),
        "first_removed_seq": expired[0][0] if expired else None,
        "last_removed_seq": expired[-1][0] if expired else None,
        "last_removed_hash": expired[-1][1] if expired else None,
        "removed_ranges": json.dumps(_ranges([s for s, _ in expired])),
    }
    if expired:
        con.execute("DELETE FROM audit_log WHERE coalesce(occurred_at, recorded_at) < ?", [cutoff])
    tables.insert(con, "audit_checkpoints", [checkpoint])
    return checkpoint


def build_report(
    con: duckdb.DuckDBPyConnection, retention_days: int, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    total, valid, jobs, oldest, newest, expired = con.execute(
        """
        SELECT count(*), count(*) FILTER (WHERE valid), count(DISTINCT job_id),
               min(occurred_at), max(occurred_at),
               count(*) FILTER (WHERE coalesce(occurred_at, recorded_at) < ?)
        FROM audit_log
        """,
        [cutoff],
    ).fetchone()  # type: ignore[misc]
    last_run = con.execute("SELECT max(created_at) FROM audit_checkpoints").fetchone()[0]  # type: ignore[index]
    chain = verify_store(con)
    compliant = expired == 0
    if compliant:
        status = "compliant" + (
            f" (last retention run {last_run:%Y-%m-%d %H:%M} UTC)"
            if last_run
            else " (no retention run needed yet)"
        )
    else:
        status = f"overdue: {expired} records older than {retention_days} days"
    return {
        "report_id": str(uuid.uuid4()),
        "generated_at": now,
        "total_events": total,
        "valid_events": valid,
        "invalid_events": total - valid,
        "jobs_covered": jobs,
        "retention_days": retention_days,
        "retention_status": status,
        "retention_compliant": compliant,
        "expired_records": expired,
        "chain_verified": chain.ok,
        "chain_error": None if chain.ok else f"seq {chain.first_bad_seq}: {chain.reason}",
        "oldest_event": oldest,
        "newest_event": newest,
    }


def save_report(con: duckdb.DuckDBPyConnection, report: dict[str, Any]) -> None:
    row = dict(report)
    row["report"] = json.dumps(report, default=str)
    tables.insert(con, "compliance_reports", [row])


def generate_report(store: StoreBase) -> dict[str, Any]:
    """Build the report from one read-only snapshot (the chain check scans the whole
    trail: never inside a write transaction), then save it in a short one."""
    with store.snapshot() as con:
        report = build_report(con, store.settings.retention_days)
    store.write(lambda con: save_report(con, report))
    return report


def latest_report(store: StoreBase, generate: bool = False) -> dict[str, Any] | None:
    if generate:
        return generate_report(store)
    store.ensure_schema()
    columns, rows = store.query(
        "SELECT * EXCLUDE (report) FROM compliance_reports ORDER BY generated_at DESC LIMIT 1"
    )
    return dict(zip(columns, rows[0], strict=True)) if rows else None
