"""Metrics rollups: hourly and daily buckets of job metrics (counts, p50/p95 durations).

Each run recomputes only the buckets that received rows since the previous rollup (with
a safety margin for rows still in flight), replacing them whole: running it twice, or
after late events, gives the same table as one run over everything.
"""

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import dagster as dg
from duckdb import DuckDBPyConnection

from horizons_platform.defs.ingest import job_metrics
from horizons_platform.defs.resources import DUCKDB_POOL, DuckDBStore

METRICS_GROUP = "metrics"
Grain = Literal["hour", "day"]
TABLES: dict[Grain, str] = {"hour": "metrics_hourly", "day": "metrics_daily"}
# A consumer stamps ingested_at before its transaction commits; rows stamped up to this
# long before the previous rollup may still have been invisible to it.
IN_FLIGHT_MARGIN = timedelta(minutes=10)


def rollup(con: DuckDBPyConnection, grain: Grain, now: datetime | None = None) -> dict[str, Any]:
    """Recompute the ``grain`` buckets touched by new job_metrics rows (caller's transaction)."""
    table = TABLES[grain]
    now = now or datetime.now(UTC)
    # Buckets are UTC hours/days whatever the machine's zone.
    con.execute("SET TimeZone = 'UTC'")
    last = con.execute(f"SELECT max(computed_at) FROM {table}").fetchall()[0][0]
    since = (last - IN_FLIGHT_MARGIN) if last is not None else datetime.min.replace(tzinfo=UTC)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _touched AS
        SELECT DISTINCT date_trunc('{grain}', occurred_at) AS bucket_start
        FROM job_metrics WHERE ingested_at >= ?
        """,
        [since],
    )
    buckets = con.execute("SELECT count(*) FROM _touched").fetchall()[0][0]
    con.execute(f"DELETE FROM {table} WHERE bucket_start IN (SELECT bucket_start FROM _touched)")
    con.execute(
        f"""
        INSERT INTO {table}
        SELECT date_trunc('{grain}', occurred_at) AS bucket_start,
               coalesce(job_type, 'unknown') AS job_type,
               coalesce(outcome, 'unknown') AS outcome,
               count(*) AS jobs,
               quantile_cont(duration_s, 0.5) AS p50_duration_s,
               quantile_cont(duration_s, 0.95) AS p95_duration_s,
               avg(queue_time_s) AS avg_queue_time_s,
               sum(cpu_hours) AS cpu_hours,
               sum(bytes_processed) AS bytes_processed,
               ? AS computed_at
        FROM job_metrics
        WHERE date_trunc('{grain}', occurred_at) IN (SELECT bucket_start FROM _touched)
        GROUP BY ALL
        """,
        [now],
    )
    con.execute("DROP TABLE _touched")
    rows, jobs = con.execute(f"SELECT count(*), coalesce(sum(jobs), 0) FROM {table}").fetchall()[0]
    return {"buckets_recomputed": int(buckets), "rows": int(rows), "jobs": int(jobs)}


def _materialize(grain: Grain, duckdb: DuckDBStore) -> dg.MaterializeResult:
    with duckdb.get().transaction() as con:
        stats = rollup(con, grain)
        latest = con.execute(
            f"""
            SELECT job_type, outcome, jobs, p50_duration_s, p95_duration_s, avg_queue_time_s
            FROM {TABLES[grain]}
            WHERE bucket_start = (SELECT max(bucket_start) FROM {TABLES[grain]})
            ORDER BY job_type, outcome
            """
        ).fetchall()
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(stats["rows"]),
        "buckets_recomputed": stats["buckets_recomputed"],
        "jobs_rolled_up": stats["jobs"],
        f"latest {grain}": dg.MetadataValue.md(_duration_table(latest)),
    }
    # Numbers per job type and outcome: Dagster plots numeric metadata across
    # materializations, so each becomes a time series in the asset's Plots tab.
    for job_type, outcome, jobs, p50, p95, _ in latest:
        metadata[f"p50_duration_s {job_type}/{outcome}"] = float(p50 or 0.0)
        metadata[f"p95_duration_s {job_type}/{outcome}"] = float(p95 or 0.0)
        metadata[f"jobs {job_type}/{outcome}"] = int(jobs)
    return dg.MaterializeResult(metadata=metadata)


def _duration_table(rows: list[tuple[Any, ...]]) -> str:
    if not rows:
        return "no jobs yet"
    lines = [
        "| job type | outcome | jobs | p50 duration (s) | p95 duration (s) | avg queue (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for job_type, outcome, jobs, p50, p95, queue in rows:
        lines.append(
            f"| {job_type} | {outcome} | {jobs} | {p50 or 0:.1f} | {p95 or 0:.1f} | "
            f"{queue or 0:.1f} |"
        )
    return "\n".join(lines)


@dg.asset(
    deps=[job_metrics],
    group_name=METRICS_GROUP,
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    owners=["team:horizons-platform"],
    # Every five minutes, once new job metrics arrived since the last tick.
    automation_condition=dg.AutomationCondition.on_cron("*/5 * * * *"),
    description="Hourly buckets per job type and outcome: job count, p50/p95 duration, "
    "mean queue time, CPU hours, bytes processed.",
)
def metrics_hourly(duckdb: DuckDBStore) -> dg.MaterializeResult:
    return _materialize("hour", duckdb)


@dg.asset(
    deps=[job_metrics],
    group_name=METRICS_GROUP,
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    owners=["team:horizons-platform"],
    # Percentiles do not add up from hourly buckets, so days are computed from job_metrics.
    automation_condition=dg.AutomationCondition.on_cron("0 * * * *"),
    description="Daily buckets per job type and outcome, same measures as metrics_hourly.",
)
def metrics_daily(duckdb: DuckDBStore) -> dg.MaterializeResult:
    return _materialize("day", duckdb)


def _consistency(grain: Grain, duckdb: DuckDBStore) -> dg.AssetCheckResult:
    table = TABLES[grain]
    margin = int(IN_FLIGHT_MARGIN.total_seconds())
    # A bucket must count at least the rows surely visible when it was computed and at
    # most the rows there now; rows stamped just before a rollup may fall either side.
    mismatched = f"""
        SELECT r.bucket_start, r.job_type, r.outcome, r.jobs,
               count(m.event_id) FILTER (
                   WHERE m.ingested_at <= r.computed_at - INTERVAL {margin} SECOND) AS surely_seen,
               count(m.event_id) AS present
        FROM {table} r LEFT JOIN job_metrics m
          ON date_trunc('{grain}', m.occurred_at) = r.bucket_start
         AND coalesce(m.job_type, 'unknown') = r.job_type
         AND coalesce(m.outcome, 'unknown') = r.outcome
        GROUP BY ALL HAVING r.jobs < surely_seen OR r.jobs > present
    """
    unordered = f"SELECT * FROM {table} WHERE p50_duration_s > p95_duration_s"
    with duckdb.get().transaction() as con:
        con.execute("SET TimeZone = 'UTC'")
        n_bad = con.execute(f"SELECT count(*) FROM ({mismatched})").fetchone()[0]
        n_unordered = con.execute(f"SELECT count(*) FROM ({unordered})").fetchone()[0]
        buckets = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        sample = con.execute(mismatched).fetchmany(3)
    ok = n_bad == 0 and n_unordered == 0
    return dg.AssetCheckResult(
        passed=ok,
        description=None
        if ok
        else f"{n_bad} buckets disagree with job_metrics, {n_unordered} with p50 > p95: {sample}",
        metadata={"buckets": int(buckets), "mismatched": int(n_bad), "p50_above_p95": n_unordered},
    )


@dg.asset_check(
    asset=metrics_hourly,
    description="Every hourly bucket counts exactly the job_metrics rows in it; p50 ≤ p95.",
)
def metrics_hourly_consistent(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    return _consistency("hour", duckdb)


@dg.asset_check(
    asset=metrics_daily,
    description="Every daily bucket counts exactly the job_metrics rows in it; p50 ≤ p95.",
)
def metrics_daily_consistent(duckdb: DuckDBStore) -> dg.AssetCheckResult:
    return _consistency("day", duckdb)


metrics_rollup_job = dg.define_asset_job(
    "metrics_rollup_job",
    selection=dg.AssetSelection.assets(metrics_hourly, metrics_daily),
    description="Recompute the hourly and daily metrics buckets that received new data.",
)

ASSETS = [metrics_hourly, metrics_daily]
CHECKS = [metrics_hourly_consistent, metrics_daily_consistent]
JOBS = [metrics_rollup_job]
