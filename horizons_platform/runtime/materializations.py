"""Reports the consumer-fed tables' materializations to the Dagster instance, from the
consumer host (a background thread; ingestion never waits on Dagster).

Here, not in ``defs/``: the ingest process uses the Dagster *instance* API only, and
must not import the definitions (asset checks, jobs) to do it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duckdb import DuckDBPyConnection

from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase

if TYPE_CHECKING:
    import dagster as dg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedTable:
    """A table one consumer group writes, and how to measure it cheaply."""

    name: str
    group: str  # the consumer group that writes it ("" = every group)
    written_at: str  # the column holding when a row was written
    has_offset: bool  # rows carry their Kafka ("partition", "offset")
    description: str


FED_TABLES: tuple[FedTable, ...] = (
    FedTable(
        "audit_log",
        "compliance-auditor",
        "recorded_at",
        True,
        "Every event the ComplianceAuditor saw, valid or not, hash-chained (seq, prev_hash, "
        "hash). Immutable; only the retention job removes expired records.",
    ),
    FedTable(
        "job_events",
        "metrics",
        "ingested_at",
        True,
        "One row per valid job lifecycle or metrics event, keyed by event_id.",
    ),
    FedTable("jobs", "metrics", "updated_at", False, "One row per job: its current state."),
    FedTable("job_metrics", "metrics", "ingested_at", False, "One row per job.metrics event."),
    FedTable(
        "notifications",
        "notifications",
        "created_at",
        False,
        "The notification outbox: one row per e-mail to a job owner, with delivery status.",
    ),
    FedTable(
        "health_signals",
        "system-health",
        "observed_at",
        False,
        "Lag, rate and heartbeat samples from the consumers and the health monitor.",
    ),
    FedTable(
        "dead_letters",
        "",
        "received_at",
        True,
        "Messages a consumer rejected (bad JSON, invalid schema, handler error), per group.",
    ),
)


def table_stats(con: DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """Row count, last write and Kafka position of every consumer-fed table (a few ms;
    read in one snapshot, or the positions and the counts disagree)."""
    positions = dict(
        con.execute(
            "SELECT consumer_group, sum(next_offset) FROM consumer_offsets GROUP BY ALL"
        ).fetchall()
    )
    out: dict[str, dict[str, Any]] = {}
    for t in FED_TABLES:
        offset = 'max("offset")' if t.has_offset else "NULL"
        rows, last, max_offset = con.execute(
            f"SELECT count(*), max({t.written_at}), {offset} FROM {t.name}"
        ).fetchall()[0]
        out[t.name] = {
            "rows": int(rows),
            "last_written_at": last,
            "max_offset": max_offset,
            "group_position": int(positions.get(t.group) or 0),
        }
    return out


def materialization_event(table: str, stats: dict[str, Any]) -> dg.AssetMaterialization:
    import dagster as dg  # here, not at the top: see _default_instance

    fed = next(t for t in FED_TABLES if t.name == table)
    metadata: dict[str, Any] = {"dagster/row_count": dg.MetadataValue.int(stats["rows"])}
    if fed.group:
        metadata["consumer_group"] = fed.group
        # Messages the writing group has consumed, summed over its partitions.
        metadata["group_position"] = dg.MetadataValue.int(stats["group_position"])
    if stats["max_offset"] is not None:
        metadata["max_offset"] = dg.MetadataValue.int(int(stats["max_offset"]))
    if stats["last_written_at"] is not None:
        metadata["last_written_at"] = dg.MetadataValue.timestamp(stats["last_written_at"])
    return dg.AssetMaterialization(
        asset_key=table,
        description=f"reported by the consumer host (pid {os.getpid()})",
        metadata=metadata,
    )


def _default_instance(settings: Settings) -> dg.DagsterInstance | None:
    # Importing Dagster takes ~0.8-1.8 s of the GIL; at the top of this module it came
    # before the consumers of a restarted host could take their partitions back, and a
    # host with no Dagster instance to report to must not pay it at all (it took that
    # much from the consumer loops 10 s into every `horizons bench ingest` run). The
    # first report is materialization_interval_s after the start, so it is imported then.
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_dir).resolve()
    if not (home / "dagster.yaml").exists():
        return None
    import dagster as dg

    # dagster.yaml reads DAGSTER_HOME for its storage paths.
    os.environ.setdefault("DAGSTER_HOME", str(home))
    return dg.DagsterInstance.from_config(str(home))


def materialization_reporter(
    settings: Settings,
    instance_factory: Callable[[], dg.DagsterInstance | None] | None = None,
) -> Callable[[threading.Event, StoreBase], None]:
    """A consumer-host background hook: report fed-table materializations to Dagster.

    Every ``materialization_interval_s`` it reads the tables' stats in one short read
    and reports the tables that changed. It runs on its own thread and swallows every
    error, so ingestion never waits on Dagster (or on a missing Dagster instance).
    """
    factory = instance_factory or (lambda: _default_instance(settings))

    def report_materializations(stop: threading.Event, store: StoreBase) -> None:
        instance: dg.DagsterInstance | None = None
        last: dict[str, tuple[Any, ...]] = {}
        warned = False
        while not stop.wait(settings.materialization_interval_s):
            try:
                instance = instance or factory()
                if instance is None:
                    if not warned:
                        log.info("no Dagster instance found: not reporting materializations")
                        warned = True
                    continue
                # One snapshot: read statement by statement, a batch committed between
                # the positions and the counts was reported as 9 rows at position 0 —
                # and, the rows unchanged since, kept so (CI).
                with store.snapshot() as con:
                    stats = table_stats(con)
                for table, s in stats.items():
                    # The table's own content, not the group's position: a consumer that
                    # read messages without writing rows did not materialize anything.
                    signature = (s["rows"], s["max_offset"], s["last_written_at"])
                    if last.get(table) == signature:
                        continue  # unchanged: no new event, keeps the instance's log small
                    instance.report_runless_asset_event(materialization_event(table, s))
                    last[table] = signature
            except Exception as exc:
                log.warning("could not report materializations to Dagster: %s", exc)

    return report_materializations
