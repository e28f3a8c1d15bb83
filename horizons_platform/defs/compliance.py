"""Compliance: the audit trail's checks, retention, and the compliance report.

The audit chain and retention logic live in :mod:`horizons_platform.services.audit` and
:mod:`horizons_platform.services.compliance`; this module schedules and checks them.
"""

import socket
from datetime import datetime
from typing import Any

import dagster as dg

from horizons_platform.defs.ingest import audit_log
from horizons_platform.defs.resources import (
    DUCKDB_POOL,
    DuckDBStore,
    HorizonsSettings,
    KafkaPublisher,
)
from horizons_platform.runtime.publications import enqueue_audit, publish_now
from horizons_platform.services.audit_check import check_trail
from horizons_platform.services.compliance import (
    generate_report,
    report_markdown,
    retention_by_table,
    run_retention,
)

COMPLIANCE_GROUP = "compliance"
REPORT_FIELDS = ("total_events", "jobs_covered", "retention_status", "retention_compliant")


# --- checks on the audit trail ---------------------------------------------------------


@dg.asset_check(
    asset=audit_log.key,
    blocking=True,
    description="The audit trail verifies: the SHA-256 hash chain (incrementally, from the "
    "last verified record), every Ed25519-signed head and retention checkpoint, every "
    "signed head still matching its row, and the newest head published on audit-trail "
    "held by the store. Rows verified before are not recomputed here: the daily "
    "compliance report (and `horizons verify-audit`) recompute every record.",
)
def audit_chain_verifies(duckdb: DuckDBStore, settings: HorizonsSettings) -> dg.AssetCheckResult:
    chain = check_trail(duckdb.get(), settings.get())
    metadata: dict[str, Any] = {
        "records_verified": chain.checked,
        "signed_heads_verified": chain.heads_verified,
        "first_bad_seq": chain.first_bad_seq or 0,
        "unsigned_tail": chain.unsigned_tail,
    }
    if chain.newest_head is not None:
        metadata["newest_signed_head_seq"] = chain.newest_head.seq
        metadata["newest_signed_head_at"] = dg.MetadataValue.timestamp(chain.newest_head.signed_at)
    if chain.notes:
        metadata["notes"] = "; ".join(chain.notes)
    return dg.AssetCheckResult(
        passed=chain.ok, description=None if chain.ok else chain.summary(), metadata=metadata
    )


@dg.asset_check(
    asset=audit_log.key,
    blocking=True,
    description="No row is older than the retention policy in any table with personal data "
    "(audit_log, job_events, jobs, notifications, dead_letters: HORIZONS_RETENTION_DAYS) or "
    "in the health tables (HORIZONS_HEALTH_RETENTION_DAYS), by the platform's own clock.",
)
def audit_retention_compliant(
    duckdb: DuckDBStore, settings: HorizonsSettings
) -> dg.AssetCheckResult:
    s = settings.get()
    with duckdb.get().snapshot() as con:
        policy = retention_by_table(con, s)
        last_run = con.execute("SELECT max(created_at) FROM audit_checkpoints").fetchone()[0]
    late = {t: p["expired_rows"] for t, p in policy.items() if not p["within_policy"]}
    metadata: dict[str, Any] = {
        "retention_days": s.retention_days,
        "health_retention_days": s.health_retention_days,
        "expired_records": int(policy["audit_log"]["expired_rows"]),
        **{f"expired_rows/{t}": int(p["expired_rows"]) for t, p in policy.items()},
    }
    oldest = policy["audit_log"]["oldest"]
    if oldest is not None:
        metadata["oldest_record"] = dg.MetadataValue.timestamp(oldest)
    if last_run is not None:
        metadata["last_retention_run"] = dg.MetadataValue.timestamp(last_run)
    return dg.AssetCheckResult(
        passed=not late,
        description=None
        if not late
        else "older than the retention policy: "
        + ", ".join(f"{t} {n} rows" for t, n in late.items())
        + ": run retention_job",
        metadata=metadata,
    )


@dg.asset_check(
    asset=audit_log.key,
    blocking=True,
    description="Schema consistency: valid records carry event_id, event_type, job or "
    "producer time and payload; every invalid record keeps its validation_error and raw bytes.",
)
def audit_records_well_formed(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    bad_valid = """
        SELECT seq FROM audit_log WHERE valid AND (event_id IS NULL OR event_type IS NULL
            OR occurred_at IS NULL OR payload IS NULL)
    """
    bad_invalid = """
        SELECT seq FROM audit_log WHERE NOT valid
            AND (validation_error IS NULL OR validation_error = '' OR raw IS NULL)
    """
    with duckdb.get().snapshot() as con:
        n_valid = con.execute(f"SELECT count(*) FROM ({bad_valid})").fetchone()[0]
        n_invalid = con.execute(f"SELECT count(*) FROM ({bad_invalid})").fetchone()[0]
        total, invalid = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT valid) FROM audit_log"
        ).fetchone()
        seqs = [
            r[0] for r in con.execute(f"{bad_valid} UNION ALL {bad_invalid} LIMIT 5").fetchall()
        ]
    ok = n_valid == 0 and n_invalid == 0
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else f"malformed audit records, first seqs: {seqs}",
        metadata={
            "records": int(total),
            "invalid_records": int(invalid),
            "valid_missing_fields": int(n_valid),
            "invalid_missing_error_or_raw": int(n_invalid),
        },
    )


# --- the compliance report -----------------------------------------------------------


@dg.asset(
    deps=[audit_log],
    group_name=COMPLIANCE_GROUP,
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    owners=["team:horizons-platform"],
    description="The compliance report (a row in compliance_reports): total events, jobs "
    "covered, retention status and compliance, chain verification, oldest/newest event.",
)
def compliance_report(
    context: dg.AssetExecutionContext, duckdb: DuckDBStore, settings: HorizonsSettings
) -> dg.MaterializeResult:
    report = generate_report(duckdb.get())
    context.log.info(
        "report %s: %s events, %s jobs, %s",
        report["report_id"],
        report["total_events"],
        report["jobs_covered"],
        report["retention_status"],
    )
    metadata: dict[str, Any] = {
        "report_id": report["report_id"],
        "total_events": int(report["total_events"]),
        "jobs_covered": int(report["jobs_covered"]),
        "retention_status": report["retention_status"],
        "retention_compliant": bool(report["retention_compliant"]),
        "chain_verified": bool(report["chain_verified"]),
        "invalid_events": int(report["invalid_events"]),
    }
    if report["chain_error"]:
        metadata["chain_error"] = report["chain_error"]
    if report["key_id"]:
        metadata["signing_key_id"] = report["key_id"]
    if report["head_seq"] is not None:
        metadata["signed_head_seq"] = int(report["head_seq"])
    metadata["report"] = dg.MetadataValue.md(report_markdown(report))
    metadata["tables_within_policy"] = dg.MetadataValue.md(
        "| table | oldest row | kept (days) | expired rows |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {t} | {p['oldest'] or '-'} | {p['retention_days']} | {p['expired_rows']} |"
            for t, p in report["tables"].items()
        )
    )
    for key in ("oldest_event", "newest_event"):
        if report[key] is not None:
            metadata[key] = dg.MetadataValue.timestamp(report[key])
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=compliance_report,
    blocking=True,
    description="The latest report has total_events, jobs_covered, retention_status, and "
    "says retention is compliant and the audit chain verified.",
)
def compliance_report_complete(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    store = duckdb.get()
    columns, rows = store.query(
        "SELECT * EXCLUDE (report) FROM compliance_reports ORDER BY generated_at DESC LIMIT 1"
    )
    if not rows:
        return dg.AssetCheckResult(passed=False, description="no compliance report yet")
    report = dict(zip(columns, rows[0], strict=True))
    missing = [f for f in REPORT_FIELDS if report.get(f) is None]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    if not report["retention_compliant"]:
        problems.append(f"retention not compliant: {report['retention_status']}")
    if not report["chain_verified"]:
        problems.append(f"audit chain not verified: {report['chain_error']}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={
            "report_id": report["report_id"],
            "generated_at": dg.MetadataValue.timestamp(report["generated_at"]),
            **{f: str(report[f]) for f in REPORT_FIELDS},
        },
    )


compliance_report_job = dg.define_asset_job(
    "compliance_report_job",
    selection=dg.AssetSelection.assets(compliance_report),
    description="Generate the compliance report and check it (daily, and on demand).",
)


# --- retention -------------------------------------------------------------------------


@dg.op(pool=DUCKDB_POOL, out=dg.Out(dict))
def apply_retention(
    context: dg.OpExecutionContext,
    duckdb: DuckDBStore,
    settings: HorizonsSettings,
    kafka: KafkaPublisher,
) -> dict[str, Any]:
    """Remove what the retention policy says expired in every table and record the signed
    checkpoint, in one transaction."""
    s = settings.get()
    store = duckdb.get()
    with store.transaction() as con:
        checkpoint = run_retention(con, s)
        remaining = con.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        details = {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in checkpoint.items()
        }
        # The run itself goes into the audit trail, like every other action: through the
        # publication outbox, in the transaction that removed the records.
        record = enqueue_audit(
            con,
            s,
            f"dagster run {context.run_id}",
            "retention.run",
            {**details, "retention_days": s.retention_days},
            producer=f"dagster:retention_job@{socket.gethostname()}",
        )
    publish_now(store, kafka.get(), [record])
    context.log.info(
        "removed %d audit records older than %s (%d remain); per table: %s",
        checkpoint["removed_count"],
        details["cutoff"],
        remaining,
        checkpoint["removed_per_table"],
    )
    context.log_event(
        dg.AssetMaterialization(
            asset_key=audit_log.key,
            description="retention_job removed expired records",
            metadata={
                "dagster/row_count": dg.MetadataValue.int(int(remaining)),
                "removed_count": int(checkpoint["removed_count"]),
                "cutoff": dg.MetadataValue.timestamp(checkpoint["cutoff"]),
                "checkpoint_id": checkpoint["checkpoint_id"],
            },
        )
    )
    return details


@dg.op
def verify_chain_after_retention(
    context: dg.OpExecutionContext,
    checkpoint: dict[str, Any],
    duckdb: DuckDBStore,
    settings: HorizonsSettings,
) -> None:
    """The remaining chain must still verify from the checkpoint; fail the run if not."""
    chain = check_trail(duckdb.get(), settings.get())
    if not chain.ok:
        raise dg.Failure(
            description=f"after retention checkpoint {checkpoint['checkpoint_id']}: "
            f"{chain.summary()}",
            metadata={"records_verified": chain.checked},
        )
    context.log.info("audit chain verified over %d remaining records", chain.checked)


@dg.job(
    description="Daily: delete what is older than the retention policy in every table, "
    "record a signed checkpoint (and an audit record), then verify the remaining trail."
)
def retention_job() -> None:
    verify_chain_after_retention(apply_retention())


retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule",
    job=retention_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
compliance_report_schedule = dg.ScheduleDefinition(
    name="compliance_report_schedule",
    job=compliance_report_job,
    cron_schedule="30 2 * * *",  # after retention, so the report reflects it
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)

ASSETS = [compliance_report]
CHECKS = [
    audit_chain_verifies,
    audit_retention_compliant,
    audit_records_well_formed,
    compliance_report_complete,
]
JOBS: list[Any] = [  # a job and an asset job: Dagster exports no common type
    compliance_report_job,
    retention_job,
]
SCHEDULES = [retention_schedule, compliance_report_schedule]
