"""The consumer-fed tables as Dagster assets, and the checks on what the consumers wrote.

The four consumer services, not Dagster, write these tables, so they are external assets
(:class:`dagster.AssetSpec`). The consumer host reports their materializations (row
count, offsets, last write) to the Dagster instance from a background thread, so the UI
shows their freshness (runtime/materializations.py: the host never imports this module).
"""

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from duckdb import DuckDBPyConnection

from horizons_platform import event_schemas
from horizons_platform import events as ev
from horizons_platform.defs.resources import DuckDBStore, HorizonsSettings
from horizons_platform.runtime.materializations import FED_TABLES, FedTable
from horizons_platform.runtime.monitor import UNDELIVERED_SQL, stale_claim_s

log = logging.getLogger(__name__)


INGEST_GROUP = "ingest"


def _spec(table: FedTable) -> dg.AssetSpec:
    return dg.AssetSpec(
        table.name,
        description=table.description,
        group_name=INGEST_GROUP,
        kinds={"duckdb", "kafka"},
        owners=["team:horizons-platform"],
        tags={"horizons/consumer_group": table.group or "all"},
        metadata={"horizons/written_by": f"consumer group {table.group or 'every group'}"},
    )


SPECS: dict[str, dg.AssetSpec] = {t.name: _spec(t) for t in FED_TABLES}
audit_log = SPECS["audit_log"]
job_events = SPECS["job_events"]
jobs = SPECS["jobs"]
job_metrics = SPECS["job_metrics"]
notifications = SPECS["notifications"]
health_signals = SPECS["health_signals"]
dead_letters = SPECS["dead_letters"]


# --- checks on what the consumers wrote ------------------------------------------------

_LIFECYCLE = ", ".join(f"'{t}'" for t in ev.LIFECYCLE_TYPES)
_TERMINAL = ", ".join(f"'{t}'" for t in ev.TERMINAL_TYPES)
_JOB_EVENT_TYPES = ", ".join(f"'{t}'" for t in (*ev.LIFECYCLE_TYPES, ev.JOB_METRICS))
JOB_STATUSES = tuple(ev.JOB_STATUS_RANK)


def _sample(con: DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> str:
    rows = con.execute(sql, params or []).fetchmany(5)
    return "; ".join(", ".join(str(v) for v in r) for r in rows)


@dg.asset_check(
    asset=job_events.key,
    blocking=True,
    description="No job_events row lacks a required column, every event type is a job "
    "event, and every jobs row has a known status.",
)
def job_events_required_fields(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    missing = f"""
        SELECT event_id, event_type, job_id FROM job_events
        WHERE event_id IS NULL OR event_type IS NULL OR job_id IS NULL OR job_id = ''
           OR occurred_at IS NULL OR payload IS NULL OR topic IS NULL
           OR "partition" IS NULL OR "offset" IS NULL OR event_type NOT IN ({_JOB_EVENT_TYPES})
    """
    statuses = ", ".join(f"'{s}'" for s in JOB_STATUSES)
    bad_jobs = f"SELECT job_id, status FROM jobs WHERE status NOT IN ({statuses}) OR owner IS NULL"
    with duckdb.get().snapshot() as con:
        n_bad = con.execute(f"SELECT count(*) FROM ({missing})").fetchone()[0]
        n_jobs = con.execute(f"SELECT count(*) FROM ({bad_jobs})").fetchone()[0]
        total = con.execute("SELECT count(*) FROM job_events").fetchone()[0]
        sample = _sample(con, missing) + _sample(con, bad_jobs)
    return dg.AssetCheckResult(
        passed=n_bad == 0 and n_jobs == 0,
        description=None if n_bad == n_jobs == 0 else f"first offenders: {sample}",
        metadata={"rows_checked": total, "bad_job_events": n_bad, "bad_jobs": n_jobs},
    )


@dg.asset_check(
    asset=job_events.key,
    blocking=True,
    description="Per job, every lifecycle event sits in one partition and their offsets "
    "follow the lifecycle (submitted → started → terminal).",
)
def job_events_per_job_ordering(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    events = f"""
        SELECT job_id, topic, "partition", "offset",
               CASE event_type WHEN 'job.submitted' THEN 0 WHEN 'job.started' THEN 1
                    ELSE 2 END AS step
        FROM job_events WHERE event_type IN ({_LIFECYCLE})
    """
    spread = f"""
        SELECT job_id, count(DISTINCT (topic, "partition")) AS partitions FROM ({events})
        GROUP BY job_id HAVING count(DISTINCT (topic, "partition")) > 1
    """
    disorder = f"""
        SELECT job_id, "offset", step, prev_step FROM (
            SELECT *, lag(step) OVER (PARTITION BY job_id ORDER BY "offset") AS prev_step
            FROM ({events}))
        WHERE prev_step > step
    """
    with duckdb.get().snapshot() as con:
        n_spread = con.execute(f"SELECT count(*) FROM ({spread})").fetchone()[0]
        n_disorder = con.execute(f"SELECT count(*) FROM ({disorder})").fetchone()[0]
        n_jobs = con.execute(f"SELECT count(DISTINCT job_id) FROM ({events})").fetchone()[0]
        sample = _sample(con, spread) + _sample(con, disorder)
    ok = n_spread == 0 and n_disorder == 0
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else f"jobs out of order or spread over partitions: {sample}",
        metadata={
            "jobs_checked": n_jobs,
            "jobs_spread_over_partitions": n_spread,
            "out_of_order_events": n_disorder,
        },
    )


@dg.asset_check(
    asset=notifications.key,
    blocking=True,
    description="Every terminal job event the notification service has consumed has its "
    "notification in the outbox (and none is stuck as failed).",
)
def terminal_jobs_notified(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    # Judged against the notification group's own stored offsets rather than a grace
    # period: its rows and offsets are written in one transaction, so an event below
    # its offset without a notification was really lost, however recent.
    missing = f"""
        SELECT e.job_id, e.event_type, e.event_id FROM job_events e
        JOIN consumer_offsets o ON o.consumer_group = 'notifications'
             AND o.topic = e.topic AND o."partition" = e."partition"
        WHERE e.event_type IN ({_TERMINAL}) AND e."offset" < o.next_offset
          AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.event_id = e.event_id)
    """
    with duckdb.get().snapshot() as con:
        n_missing = con.execute(f"SELECT count(*) FROM ({missing})").fetchone()[0]
        by_status = dict(
            con.execute("SELECT status, count(*) FROM notifications GROUP BY ALL").fetchall()
        )
        terminal = con.execute(
            f"SELECT count(*) FROM job_events WHERE event_type IN ({_TERMINAL})"
        ).fetchone()[0]
        sample = _sample(con, missing)
        undelivered = con.execute(
            UNDELIVERED_SQL.format(stale_s=stale_claim_s(duckdb.settings.get()))
        ).fetchone()[0]
    failed = int(by_status.get("failed", 0))
    stuck = int(undelivered) - failed
    ok = n_missing == 0 and failed == 0 and stuck == 0
    problems = []
    if n_missing:
        problems.append(f"{n_missing} terminal events without a notification: {sample}")
    if failed:
        problems.append(f"{failed} notifications failed permanently (see notifications.error)")
    if stuck:
        problems.append(f"{stuck} notifications stuck in 'sending' (claimed, never finished)")
    return dg.AssetCheckResult(
        passed=ok,
        description="; ".join(problems) or None,
        metadata={
            "terminal_events": terminal,
            "missing_notifications": n_missing,
            "stuck_sending": stuck,
            **{f"status_{k}": int(v) for k, v in by_status.items()},
        },
    )


@dg.asset_check(
    asset=dead_letters.key,
    blocking=True,
    description="Invalid events are rejected consistently: no consumer stored as valid "
    "what the auditor flagged invalid, and every event dead-lettered for its content "
    "is in the audit trail, flagged invalid, with its raw bytes.",
)
def invalid_events_rejected_consistently(
    duckdb: DuckDBStore, settings: HorizonsSettings
) -> dg.AssetCheckResult:
    cutoff = datetime.now(UTC) - timedelta(days=settings.get().retention_days)
    accepted_invalid = """
        SELECT a.seq, a.topic, a."partition", a."offset" FROM audit_log a
        JOIN job_events e ON a.topic = e.topic AND a."partition" = e."partition"
             AND a."offset" = e."offset"
        WHERE NOT a.valid
    """
    # Only where the auditor has already consumed past the dead letter, and only for
    # records retention cannot have removed yet.
    unaudited = """
        SELECT d.consumer_group, d.topic, d."partition", d."offset" FROM dead_letters d
        JOIN consumer_offsets o ON o.consumer_group = 'compliance-auditor'
             AND o.topic = d.topic AND o."partition" = d."partition"
        WHERE d.error_class LIKE 'EventDecodeError%' AND d."offset" < o.next_offset
          AND d.received_at >= ?
          AND NOT EXISTS (
              SELECT 1 FROM audit_log a WHERE a.topic = d.topic
                 AND a."partition" = d."partition" AND a."offset" = d."offset"
                 AND NOT a.valid AND a.raw IS NOT NULL)
    """
    with duckdb.get().snapshot() as con:
        n_accepted = con.execute(f"SELECT count(*) FROM ({accepted_invalid})").fetchone()[0]
        n_unaudited = con.execute(f"SELECT count(*) FROM ({unaudited})", [cutoff]).fetchone()[0]
        letters = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        sample = _sample(con, accepted_invalid) + _sample(con, unaudited, [cutoff])
    ok = n_accepted == 0 and n_unaudited == 0
    return dg.AssetCheckResult(
        passed=ok,
        description=None if ok else f"inconsistent rejections: {sample}",
        metadata={
            "dead_letters": letters,
            "invalid_but_stored_as_job_event": n_accepted,
            "dead_lettered_but_not_audited": n_unaudited,
        },
    )


@dg.asset_check(
    asset=job_events.key,
    blocking=True,
    description="The event models still accept everything their published JSON Schemas "
    "(schemas/v<schema_version>/) promise producers: no removed field, no newly required "
    "one, no narrowed type without a new schema_version; and the files are current.",
)
def event_schemas_compatible() -> dg.AssetCheckResult:
    broken, stale = event_schemas.check()
    problems = [f"incompatible without a new schema_version: {b}" for b in broken]
    if stale:
        problems.append(
            f"published schemas out of date for {', '.join(stale)}: run `horizons schemas export`"
        )
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={
            "schema_version": ev.SCHEMA_VERSION,
            "event_types": len(event_schemas.current()),
            "incompatible_changes": len(broken),
        },
    )


CHECKS = [
    event_schemas_compatible,
    job_events_required_fields,
    job_events_per_job_ordering,
    terminal_jobs_notified,
    invalid_events_rejected_consistently,
]
ASSETS = list(SPECS.values())
