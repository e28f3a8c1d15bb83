"""The consumer host reports the consumer-fed tables' materializations to Dagster: row
counts and offsets, only when they changed, and never at the expense of ingestion."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from horizons_platform.host import Host
from horizons_platform.runtime.materializations import FED_TABLES, materialization_reporter
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import StoreOwner
from horizons_platform.waiting import wait_until

OWNER = "jocelyn@observatory.example"


def _latest(instance: dg.DagsterInstance, table: str) -> dict[str, object]:
    event = instance.get_latest_materialization_event(dg.AssetKey(table))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _count(instance: dg.DagsterInstance, table: str) -> int:
    records = instance.fetch_materializations(dg.AssetKey(table), limit=1000).records
    return len(records)


def test_host_reports_fed_table_materializations(
    settings_factory: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = settings_factory(materialization_interval_s=0.2)
    host = Host(settings, background=[materialization_reporter(settings, lambda: instance)])
    host.start()
    try:
        assert host.wait_ready(60)
        orch = JobOrchestratorService(settings, recover=False)
        for i in range(3):
            orch.submit_job(f"m-{i}", owner=OWNER, job_type="imaging")
            orch.start_job(f"m-{i}")
            orch.complete_job(f"m-{i}")
        store = Store(settings)
        wait_until(
            lambda: _latest(instance, "job_events").get("dagster/row_count") == 9,
            what="job_events reported with 9 rows",
        )
        rows = store.scalar("SELECT count(*) FROM audit_log")
        wait_until(
            lambda: _latest(instance, "audit_log").get("dagster/row_count") == rows,
            what="audit_log reported",
        )
        meta = _latest(instance, "job_events")
        assert meta["consumer_group"] == "metrics" and meta["group_position"] == 9
        assert isinstance(meta["max_offset"], int) and "last_written_at" in meta
        assert _latest(instance, "jobs")["dagster/row_count"] == 3
        # The notifications group commits on its own (groups no longer take turns).
        wait_until(
            lambda: _latest(instance, "notifications").get("dagster/row_count") == 3,
            what="notifications reported with 3 rows",
        )
        # Every fed table is reported; one that does not change is reported only once.
        assert all(_latest(instance, t.name) for t in FED_TABLES)
        before = _count(instance, "dead_letters")
        threading.Event().wait(1.0)  # five more reporting intervals
        assert before == _count(instance, "dead_letters") == 1
    finally:
        host.stop()
        host.join(30)


def test_a_broken_dagster_instance_never_stops_ingestion(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(materialization_interval_s=0.1)
    calls: list[int] = []

    def broken() -> dg.DagsterInstance:
        calls.append(1)
        raise RuntimeError("dagster storage unavailable")

    host = Host(settings, background=[materialization_reporter(settings, broken)])
    host.start()
    try:
        assert host.wait_ready(60)
        JobOrchestratorService(settings, recover=False).submit_job(
            "still-ingested", owner=OWNER, job_type="imaging"
        )
        store = Store(settings)
        wait_until(
            lambda: store.scalar("SELECT count(*) FROM job_events") == 1,
            what="ingestion despite the reporter's errors",
        )
        wait_until(lambda: len(calls) >= 3, what="the reporter to keep retrying")
    finally:
        host.stop()
        assert host.join(30) == 0


class _CommitsBetweenStatements:
    """A store whose readers see a metrics batch (3 jobs, offsets summing to 9) commit
    right after their first SELECT: the moment that made one report disagree with itself."""

    def __init__(self, owner: StoreOwner) -> None:
        self.owner = owner
        self.committed = False

    def _commit_batch(self) -> None:
        now = datetime.now(UTC)
        with self.owner.transaction() as con:
            for i in range(3):
                con.execute(
                    "INSERT INTO jobs (job_id, status, updated_at) VALUES (?, 'completed', ?)",
                    [f"j-{i}", now],
                )
                con.execute(
                    'INSERT INTO consumer_offsets (consumer_group, topic, "partition", '
                    "next_offset, updated_at, cluster_id) VALUES ('metrics', 'job-lifecycle', "
                    "?, 3, ?, 'c')",
                    [i, now],
                )
        self.committed = True

    def _interleaved(self, con: Any) -> Any:
        store = self

        class Cursor:
            def execute(self, sql: str, *args: Any) -> Any:
                result = con.execute(sql, *args)
                if sql.lstrip().upper().startswith("SELECT") and not store.committed:
                    # Another thread, as a consumer group's writer: the owner's cursors
                    # are per thread.
                    writer = threading.Thread(target=store._commit_batch)
                    writer.start()
                    writer.join()
                return result

        return Cursor()

    @contextmanager
    def reader(self) -> Iterator[Any]:
        with self.owner.reader() as con:
            yield self._interleaved(con)

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        with self.owner.snapshot() as con:
            yield self._interleaved(con)


def test_a_report_reads_its_counts_and_positions_in_one_snapshot(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    settings = Settings(var_dir=tmp_path, materialization_interval_s=0.05)
    owner = StoreOwner(settings, serve=False)
    owner.open()
    stop = threading.Event()
    report = materialization_reporter(settings, lambda: instance)
    reporter = threading.Thread(target=report, args=(stop, _CommitsBetweenStatements(owner)))
    reporter.start()
    try:
        wait_until(lambda: _latest(instance, "jobs").get("dagster/row_count") == 3, timeout=30)
        # Counted after the batch, positioned before it, and never reported again (the
        # rows did not change) — unless both come from one snapshot.
        assert _latest(instance, "jobs")["group_position"] == 9
    finally:
        stop.set()
        reporter.join(10)
        owner.close()
