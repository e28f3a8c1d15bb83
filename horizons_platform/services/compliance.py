"""Retention and the compliance report.

Retention deletes what is older than the policy allows — by the platform's clock — in
every table that holds personal data, and in the audit log writes a signed checkpoint
naming the removed seq ranges and the hash each ends with, so the remaining chain still
verifies (services/audit_verify.py). The report says, per table, whether it is within
policy, and carries the signing key and the newest signed head.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb

from horizons_platform.ids import uuid7
from horizons_platform.services.audit_verify import TrailReport, verify_trail
from horizons_platform.services.keys import load_or_create_private, load_public
from horizons_platform.services.signing import key_id, public_pem, sign_checkpoint
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


# Every table the retention policy covers: (table, the platform's timestamp of a row,
# extra condition for a row to go, which period). Personal data (owners' addresses, mail
# bodies, raw events) lives in the first group; rows are deleted, not redacted
# (docs/decisions.md). Only the platform's clocks count: a producer's occurred_at of
# 1970 or 9999 neither deletes an event early nor keeps it for ever.
POLICY: tuple[tuple[str, str, str, str], ...] = (
    ("audit_log", "recorded_at", "TRUE", "retention_days"),
    ("job_events", "ingested_at", "TRUE", "retention_days"),
    ("jobs", "updated_at", "TRUE", "retention_days"),
    ("notifications", "created_at", "status NOT IN ('pending', 'sending')", "retention_days"),
    ("dead_letters", "received_at", "TRUE", "retention_days"),
    ("health_signals", "observed_at", "TRUE", "health_retention_days"),
    ("health_alerts", "raised_at", "resolved_at IS NOT NULL", "health_retention_days"),
)


def _ranges(rows: list[tuple[int, str]]) -> list[list[Any]]:
    """[first, last, hash of last] of each run of consecutive seqs."""
    out: list[list[Any]] = []
    for seq, digest in rows:
        if out and seq == out[-1][1] + 1:
            out[-1][1], out[-1][2] = seq, digest
        else:
            out.append([seq, seq, digest])
    return out


def _cutoffs(settings: Settings, now: datetime) -> dict[str, datetime]:
    return {
        "retention_days": now - timedelta(days=settings.retention_days),
        "health_retention_days": now - timedelta(days=settings.health_retention_days),
    }


def run_retention(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    now: datetime | None = None,
    signer: Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """Remove what the policy says has expired, in every table (inside the caller's
    transaction); returns the audit checkpoint, signed, with the count per table."""
    now = now or datetime.now(UTC)
    cutoffs = _cutoffs(settings, now)
    cutoff = cutoffs["retention_days"]
    expired = con.execute(
        "SELECT seq, hash FROM audit_log WHERE recorded_at < ? ORDER BY seq", [cutoff]
    ).fetchall()
    previous = con.execute(
        "SELECT checkpoint_id FROM audit_checkpoints WHERE signature IS NOT NULL "
        "ORDER BY created_at DESC, checkpoint_id DESC LIMIT 1"
    ).fetchall()
    checkpoint: dict[str, Any] = {
        "checkpoint_id": str(uuid7()),
        "created_at": now,
        "cutoff": cutoff,
        "removed_count": len(expired),
        "first_removed_seq": expired[0][0] if expired else None,
        "last_removed_seq": expired[-1][0] if expired else None,
        "last_removed_hash": expired[-1][1] if expired else None,
        "removed_ranges": json.dumps(_ranges(expired)),
        "prev_checkpoint_id": previous[0][0] if previous else None,
    }
    checkpoint = sign_checkpoint(signer or load_or_create_private(settings), checkpoint)
    removed: dict[str, int] = {}
    for table, column, extra, period in POLICY:
        where = f'"{column}" < ? AND {extra}'
        params = [cutoffs[period]]
        removed[table] = int(
            con.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchall()[0][0]
        )
        if removed[table]:
            if table == "notifications":
                con.execute(
                    "DELETE FROM notification_queue WHERE notification_id IN "
                    f"(SELECT notification_id FROM notifications WHERE {where})",
                    params,
                )
            con.execute(f"DELETE FROM {table} WHERE {where}", params)
    # Heads of removed records are no longer needed: the signed checkpoint covers them.
    if expired:
        con.execute("DELETE FROM audit_heads WHERE seq <= ?", [expired[-1][0]])
    tables.insert(con, "audit_checkpoints", [checkpoint])
    return {**checkpoint, "removed_per_table": removed}


def retention_by_table(
    con: duckdb.DuckDBPyConnection, settings: Settings, now: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Each table's oldest row (by the platform's clock) and whether it is within policy."""
    cutoffs = _cutoffs(settings, now or datetime.now(UTC))
    out = {}
    for table, column, extra, period in POLICY:
        oldest, expired = con.execute(
            f'SELECT min("{column}") FILTER (WHERE {extra}), '
            f'count(*) FILTER (WHERE "{column}" < ? AND {extra}) FROM {table}',
            [cutoffs[period]],
        ).fetchall()[0]
        out[table] = {
            "oldest": oldest,
            "retention_days": getattr(settings, period),
            "expired_rows": int(expired),
            "within_policy": expired == 0,
        }
    return out


def build_report(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    now: datetime | None = None,
    chain: TrailReport | None = None,
) -> dict[str, Any]:
    """The report from ``con``'s snapshot; ``chain`` is a verification already made (by
    default a full one here)."""
    now = now or datetime.now(UTC)
    total, valid, jobs, oldest, newest = con.execute(
        """
        SELECT count(*), count(*) FILTER (WHERE valid), count(DISTINCT job_id),
               min(occurred_at), max(occurred_at)
        FROM audit_log
        """
    ).fetchall()[0]
    last_run = con.execute("SELECT max(created_at) FROM audit_checkpoints").fetchall()[0][0]
    public = load_public(settings)
    chain = chain or verify_trail(con, public)
    policy = retention_by_table(con, settings, now)
    late = {t: p["expired_rows"] for t, p in policy.items() if not p["within_policy"]}
    compliant = not late
    if compliant:
        status = "compliant" + (
            f" (last retention run {last_run:%Y-%m-%d %H:%M} UTC)"
            if last_run
            else " (no retention run needed yet)"
        )
    else:
        status = "overdue: " + ", ".join(f"{t} {n} rows" for t, n in late.items())
    head = chain.newest_head
    return {
        "report_id": str(uuid7()),
        "generated_at": now,
        "total_events": total,
        "valid_events": valid,
        "invalid_events": total - valid,
        "jobs_covered": jobs,
        "retention_days": settings.retention_days,
        "retention_status": status,
        "retention_compliant": compliant,
        "expired_records": policy["audit_log"]["expired_rows"],
        "chain_verified": chain.ok,
        "chain_error": None if chain.ok else f"seq {chain.first_bad_seq}: {chain.reason}",
        "oldest_event": oldest,
        "newest_event": newest,
        "key_id": key_id(public) if public is not None else None,
        "public_key": public_pem(public) if public is not None else None,
        "head_seq": head.seq if head else None,
        "head_signed_at": head.signed_at if head else None,
        "head": head.as_json() if head else None,
        "tables": policy,
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a compliance officer reads it (shown in the Dagster UI)."""
    ok = "yes" if report["retention_compliant"] else "**NO**"
    chain = "verified" if report["chain_verified"] else f"**BROKEN**: {report['chain_error']}"
    head = report.get("head") or {}
    lines = [
        f"# Compliance report {report['report_id']}",
        f"Generated {report['generated_at']:%Y-%m-%d %H:%M:%S} UTC.",
        "",
        "| | |",
        "|---|---|",
        f"| events audited | {report['total_events']:,} "
        f"({report['invalid_events']:,} invalid, kept flagged) |",
        f"| jobs covered | {report['jobs_covered']:,} |",
        f"| oldest / newest event | {report['oldest_event']} / {report['newest_event']} |",
        f"| audit chain | {chain} |",
        f"| newest signed head | seq {head.get('seq', '-')} at {head.get('signed_at', '-')} |",
        f"| signing key | `{report.get('key_id') or '-'}` |",
        f"| retention ({report['retention_days']} days) | {report['retention_status']} |",
        f"| retention compliant | {ok} |",
        "",
        "## Retention per table",
        "",
        "| table | oldest row | kept (days) | expired rows | within policy |",
        "|---|---|---:|---:|---|",
    ]
    for table, p in report.get("tables", {}).items():
        lines.append(
            f"| {table} | {p['oldest'] or '-'} | {p['retention_days']} | {p['expired_rows']} | "
            f"{'yes' if p['within_policy'] else '**no**'} |"
        )
    if report.get("public_key"):
        lines += ["", "## Public key", "", "```", report["public_key"].strip(), "```"]
    return "\n".join(lines)


def save_report(con: duckdb.DuckDBPyConnection, report: dict[str, Any]) -> None:
    row = {k: v for k, v in report.items() if k not in ("head", "tables")}
    row["report"] = json.dumps(report, default=str)
    tables.insert(con, "compliance_reports", [row])


def generate_report(store: StoreBase) -> dict[str, Any]:
    """Verify the whole trail (with Kafka as the witness), build the report from one
    read-only snapshot, then save it in a short transaction. The report's
    ``chain_verified`` is what an auditor reads: every record is recomputed, not only
    those since the last verification (an old row edited in place would pass that)."""
    from horizons_platform.services.audit_check import check_trail

    chain = check_trail(store, store.settings, full=True)
    with store.snapshot() as con:
        report = build_report(con, store.settings, chain=chain)
    store.write(lambda con: save_report(con, report))
    return report


def latest_report(store: StoreBase, generate: bool = False) -> dict[str, Any] | None:
    if generate:
        return generate_report(store)
    store.ensure_schema()
    columns, rows = store.query(
        "SELECT * EXCLUDE (report), report->'tables' AS tables FROM compliance_reports "
        "ORDER BY generated_at DESC LIMIT 1"
    )
    if not rows:
        return None
    report = dict(zip(columns, rows[0], strict=True))
    report["tables"] = json.loads(report["tables"]) if report["tables"] else {}
    return report
