"""The consumer host reports the consumer-fed tables' materializations to Dagster: row
counts and offsets, only when they changed, and never at the expense of ingestion."""

import threading
from collections.abc import Callable

import dagster as dg

from horizons_platform.host import Host
from horizons_platform.runtime.materializations import FED_TABLES, materialization_reporter
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
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
