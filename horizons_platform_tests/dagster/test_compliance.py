"""Retention (scenario 15) and the compliance report (scenario 18) through Dagster, with
old events published through the real broker and recorded by the real auditor."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import dagster as dg

from horizons_platform import events as ev
from horizons_platform.defs import compliance
from horizons_platform.host import Host
from horizons_platform.kafka.producer import Publisher
from horizons_platform.services.audit_check import check_trail
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.dagster.conftest import Populated, check_results, execute, run_job
from horizons_platform_tests.dagster.test_checks import evaluate
from horizons_platform_tests.support import read_topic, record_in_the_past

OWNER = "henrietta@observatory.example"


def _event(job_id: str, occurred_at: datetime | None = None) -> bytes:
    return ev.encode(
        ev.new_event(
            ev.JobSubmitted,
            producer="archive",
            job_id=job_id,
            occurred_at=occurred_at or datetime.now(UTC),
            payload={"owner": OWNER, "job_type": "imaging"},
        )
    )


def _audited(store: Store, where: str = "TRUE") -> int:
    return int(store.scalar(f"SELECT count(*) FROM audit_log WHERE {where}") or 0)  # type: ignore[call-overload]


def test_scenario_15_retention_by_recorded_at_removes_expired_keeps_the_rest(
    settings: Settings,
    store: Store,
    host_factory: Callable[..., Host],
    instance: dg.DagsterInstance,
) -> None:
    now = datetime.now(UTC)
    # A store that has run for months. Retention goes by when the platform recorded a
    # record, never by the producer's clock: 9999 does not keep a record, 1970 does
    # not remove one.
    record_in_the_past(
        store,
        [
            (_event("expired-1", datetime(9999, 1, 1, tzinfo=UTC)), now - timedelta(days=100)),
            (_event("expired-2"), now - timedelta(days=91)),
            (_event("kept-89", datetime(1970, 1, 1, tzinfo=UTC)), now - timedelta(days=89)),
        ],
    )
    host_factory(settings)
    orch = JobOrchestratorService(settings)
    orch.submit_job("fresh-1", owner=OWNER, job_type="imaging")
    orch.start_job("fresh-1")
    orch.complete_job("fresh-1")
    publisher = Publisher(settings)
    for job, at in (("fresh-1970", datetime(1970, 1, 1, tzinfo=UTC)), ("fresh-9999", None)):
        when = at or datetime(9999, 12, 31, tzinfo=UTC)
        event = ev.new_event(
            ev.JobSubmitted,
            producer="clock-skewed",
            job_id=job,
            occurred_at=when,
            payload={"owner": OWNER, "job_type": "imaging"},
        )
        publisher.publish(settings.topic_job_lifecycle, event)
    wait_until(
        lambda: _audited(store, "job_id LIKE 'fresh-%'") == 5,
        what="the auditor to record the fresh events",
    )
    before = evaluate(compliance.audit_retention_compliant, settings)
    assert not before.passed and before.metadata["expired_records"].value == 2

    result = run_job(settings, "retention_job", instance)
    assert result.success
    checkpoint = result.output_for_node("apply_retention")
    assert checkpoint["removed_count"] == 2
    assert _audited(store, "job_id LIKE 'expired-%'") == 0
    assert _audited(store, "job_id = 'kept-89'") == 1
    assert _audited(store, "job_id IN ('fresh-1970', 'fresh-9999')") == 2
    assert _audited(store, "job_id = 'fresh-1'") == 3
    [materialization] = result.asset_materializations_for_node("apply_retention")
    assert materialization.asset_key == dg.AssetKey("audit_log")
    assert materialization.metadata["removed_count"].value == 2

    # The signed checkpoint lets the remaining chain verify across the gap...
    _, rows = store.query(
        "SELECT removed_count, removed_ranges, last_removed_hash, signature FROM audit_checkpoints"
    )
    assert rows[0][0] == 2 and json.loads(rows[0][1]) and rows[0][2] and rows[0][3]
    assert evaluate(compliance.audit_chain_verifies, settings).passed
    assert evaluate(compliance.audit_retention_compliant, settings).passed


def test_auditing_continues_after_retention(
    settings: Settings,
    store: Store,
    host_factory: Callable[..., Host],
    instance: dg.DagsterInstance,
) -> None:
    record_in_the_past(store, [(_event("expired-3"), datetime.now(UTC) - timedelta(days=120))])
    host_factory(settings)
    orch = JobOrchestratorService(settings)
    orch.submit_job("fresh-3", owner=OWNER, job_type="imaging")
    wait_until(lambda: _audited(store, "job_id = 'fresh-3'") == 1, what="audit")
    assert run_job(settings, "retention_job", instance).success
    assert _audited(store, "job_id = 'expired-3'") == 0
    # The retention run's own audit record, then a new job, chain on after the gap.
    orch.start_job("fresh-3")
    wait_until(
        lambda: _audited(store, "event_type = 'audit.record' AND payload LIKE '%retention.run%'"),
        timeout=10,
        what="the retention run's audit record",
    )
    wait_until(lambda: _audited(store, "job_id = 'fresh-3'") == 2, timeout=10, what="new record")
    chain = check_trail(store, settings, full=True)
    assert chain.ok, chain.summary()


def test_scenario_18_compliance_report_job(
    settings: Settings, host: Host, store: Store, instance: dg.DagsterInstance
) -> None:
    orch = JobOrchestratorService(settings)
    for i in range(3):
        orch.submit_job(f"r-{i}", owner=OWNER, job_type="calibration")
        orch.start_job(f"r-{i}")
        orch.complete_job(f"r-{i}")
    wait_until(lambda: _audited(store, "job_id LIKE 'r-%'") == 9, what="nine audited events")

    result = run_job(settings, "compliance_report_job", instance)
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "compliance_report_complete" and check.passed
    [mat] = result.asset_materializations_for_node("compliance_report")
    assert mat.metadata["retention_compliant"].value is True

    columns, rows = store.query("SELECT * FROM compliance_reports")
    report = dict(zip(columns, rows[0], strict=True))
    assert report["total_events"] == _audited(store)
    assert report["jobs_covered"] >= 3
    assert report["retention_status"].startswith("compliant")
    assert report["retention_compliant"] is True
    assert report["chain_verified"] is True


def test_report_job_fails_on_a_broken_chain_but_keeps_the_report(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    execute(store, "UPDATE audit_log SET job_id = 'forged' WHERE seq = 3")
    result = run_job(settings, "compliance_report_job", instance, raise_on_error=False)
    # The blocking check fails the run (so run_failure_sensor alerts)...
    assert not result.success
    assert not check_results(result)["compliance_report_complete"].passed
    # ...yet the report that says so is stored, for the compliance officer.
    _, rows = store.query("SELECT chain_verified, chain_error FROM compliance_reports")
    assert rows[0][0] is False and "seq 3" in rows[0][1]


def test_retention_job_fails_loudly_when_the_chain_is_broken(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = copy_of(populated)
    execute(Store(settings), "DELETE FROM audit_log WHERE seq = 5")
    result = run_job(settings, "retention_job", instance, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("verify_chain_after_retention")
    assert failure is not None and "broken at seq 6" in str(failure.user_failure_data.description)
    # Its audit record reached the audit-trail topic before the verification failed.
    records = [
        m for m in read_topic(settings, settings.topic_audit_trail) if b"retention.run" in m.value()
    ]
    assert records
