"""Asset checks over data written by real traffic: all pass on sound data, and each
fails, saying why, when the data is damaged (on a private copy of the DuckDB file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from horizons_platform.defs import compliance, ingest
from horizons_platform.services.audit_check import check_trail
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform_tests.dagster.conftest import (
    Populated,
    check_results,
    execute,
    resources,
    run_job,
)


def evaluate(check: Any, settings: Settings) -> dg.AssetCheckResult:
    """Invoke one asset check directly with the code location's resources."""
    res = resources(settings)
    wanted = {k: v for k, v in res.items() if k in check.required_resource_keys}
    return check(**wanted)


def test_checks_job_passes_on_real_traffic(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    # The populated run's consumers are stopped: their own "consumer.stopped" announcements
    # stay unconsumed and age, which is lag in seconds, not a data problem.
    settings = copy_of(populated, health_lag_seconds_threshold=3600)
    # The rollups and the report exist first, as in production.
    run_job(settings, "metrics_rollup_job", instance)
    run_job(settings, "compliance_report_job", instance)
    result = run_job(settings, "checks_job", instance)
    results = check_results(result)
    assert len(results) == 14
    failed = {n: (e.description, e.metadata) for n, e in results.items() if not e.passed}
    assert not failed
    assert results["terminal_jobs_notified"].metadata["missing_notifications"].value == 0
    # The two bad messages were rejected by every consumer and audited as invalid.
    consistency = results["invalid_events_rejected_consistently"].metadata
    assert consistency["dead_letters"].value == 2 * 4


def test_tampered_audit_row_fails_the_chain_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    execute(
        Store(settings),
        """UPDATE audit_log SET payload = '{"owner": "mallory@example.org"}' WHERE seq = 7""",
    )
    result = evaluate(compliance.audit_chain_verifies, settings)
    assert not result.passed
    assert "seq 7" in (result.description or "")
    assert result.metadata["records_verified"].value == 6


def test_the_chain_check_is_incremental_and_the_full_run_sees_verified_history(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    first = evaluate(compliance.audit_chain_verifies, settings)
    assert first.passed and first.metadata["records_verified"].value > 0
    again = evaluate(compliance.audit_chain_verifies, settings)
    assert again.passed and again.metadata["records_verified"].value == 0  # nothing new
    # An edit below the verified point that keeps the hash column is for the full run
    # (docs/decisions.md: what an incremental run checks there is counts and heads).
    execute(
        Store(settings),
        """UPDATE audit_log SET payload = '{"owner": "mallory@example.org"}' WHERE seq = 7""",
    )
    full = check_trail(Store(settings), settings, full=True)
    assert not full.ok and full.first_bad_seq == 7


def test_deleted_audit_row_fails_the_chain_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    execute(Store(settings), "DELETE FROM audit_log WHERE seq = 12")
    result = evaluate(compliance.audit_chain_verifies, settings)
    assert not result.passed and "seq 12..12 missing" in (result.description or "")


def test_missing_notification_fails_its_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    job = next(j for j in populated.jobs if j.fate == "failed")
    execute(Store(settings), "DELETE FROM notifications WHERE job_id = ?", [job.job_id])
    result = evaluate(ingest.terminal_jobs_notified, settings)
    assert not result.passed
    assert result.metadata["missing_notifications"].value == 1
    assert job.job_id in (result.description or "")


def test_failed_delivery_fails_the_notification_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    execute(
        Store(settings),
        "UPDATE notifications SET status = 'failed' WHERE notification_id = "
        "(SELECT min(notification_id) FROM notifications)",
    )
    result = evaluate(ingest.terminal_jobs_notified, settings)
    assert not result.passed and "failed permanently" in (result.description or "")


def test_out_of_order_events_fail_the_ordering_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    job = populated.jobs[0].job_id
    # Swap the offsets of the job's submitted and terminal events.
    execute(
        store,
        """
        UPDATE job_events SET "offset" = CASE event_type
            WHEN 'job.submitted' THEN (SELECT max("offset") FROM job_events
                                       WHERE job_id = ? AND topic = ?) + 1
            ELSE "offset" END
        WHERE job_id = ? AND topic = ?
        """,
        [job, settings.topic_job_lifecycle, job, settings.topic_job_lifecycle],
    )
    result = evaluate(ingest.job_events_per_job_ordering, settings)
    assert not result.passed
    assert result.metadata["out_of_order_events"].value >= 1


def test_event_spread_over_partitions_fails_the_ordering_check(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    job = populated.jobs[1].job_id
    execute(
        Store(settings),
        """UPDATE job_events SET "partition" = "partition" + 100
           WHERE job_id = ? AND event_type = 'job.started'""",
        [job],
    )
    result = evaluate(ingest.job_events_per_job_ordering, settings)
    assert not result.passed
    assert result.metadata["jobs_spread_over_partitions"].value == 1


def test_schema_checks_catch_missing_fields(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    assert evaluate(ingest.job_events_required_fields, settings).passed
    assert evaluate(compliance.audit_records_well_formed, settings).passed
    execute(store, "UPDATE audit_log SET raw = NULL WHERE NOT valid")
    execute(
        store,
        "UPDATE job_events SET payload = NULL "
        "WHERE event_id = (SELECT min(event_id) FROM job_events)",
    )
    audit = evaluate(compliance.audit_records_well_formed, settings)
    assert not audit.passed
    assert audit.metadata["invalid_missing_error_or_raw"].value == populated.bad_messages
    events = evaluate(ingest.job_events_required_fields, settings)
    assert not events.passed and events.metadata["bad_job_events"].value == 1


def test_invalid_event_accepted_by_one_consumer_fails_consistency(
    populated: Populated, copy_of: Callable[..., Settings]
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    # Pretend the metrics service stored the event the auditor rejected.
    execute(
        store,
        """
        INSERT INTO job_events SELECT 'forged', 'job.submitted', 'pop-missing', now(), 'x', 1,
            NULL, '{}', topic, "partition", "offset", now()
        FROM audit_log WHERE NOT valid AND job_id = 'pop-missing'
        """,
    )
    result = evaluate(ingest.invalid_events_rejected_consistently, settings)
    assert not result.passed
    assert result.metadata["invalid_but_stored_as_job_event"].value == 1
