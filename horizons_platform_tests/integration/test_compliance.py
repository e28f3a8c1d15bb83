"""Scenarios 15–18 at the service level: the audit chain, alerts in the audit trail,
retention and the compliance report, against the real broker and DuckDB file."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from horizons_platform import events as ev
from horizons_platform.host import Host
from horizons_platform.kafka.consumer import ConsumerLoop
from horizons_platform.kafka.producer import Publisher
from horizons_platform.runtime.monitor import check_once
from horizons_platform.services import audit
from horizons_platform.services.compliance import build_report, run_retention
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.integration.test_error_scenarios import ExplodingMetrics
from horizons_platform_tests.support import horizons, record_in_the_past

OWNER = "henrietta@observatory.example"


def _lifecycle(settings: Settings, n: int, prefix: str = "c") -> None:
    orch = JobOrchestratorService(settings, wait=False)
    for i in range(n):
        job = f"{prefix}-{i}"
        orch.submit_job(job, owner=OWNER, job_type="imaging")
        orch.start_job(job)
        orch.complete_job(job)
    orch.flush()


def _verify_cli(settings: Settings) -> subprocess.CompletedProcess[str]:
    return horizons(settings, "verify-audit", "--full", timeout=60)


def test_scenario_16_hash_covers_identity_and_changes_with_the_record(
    settings: Settings, host: Host, store: Store
) -> None:
    _lifecycle(settings, 5)
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 'c-%'") == 15,
        what="15 audit records",
    )
    with store.reader() as con:
        row = next(r for r in audit.iter_rows(con) if r["job_id"] == "c-2")
    assert audit.link(row["prev_hash"], row) == row["hash"]
    for field, value in [
        ("event_id", "00000000-0000-0000-0000-000000000000"),
        ("job_id", "c-999"),
        ("occurred_at", row["occurred_at"] + timedelta(seconds=1)),
        ("raw", row["raw"].replace(b"imaging", b"imagine")),
        ("recorded_at", row["recorded_at"] + timedelta(microseconds=1)),
    ]:
        assert audit.link(row["prev_hash"], {**row, field: value}) != row["hash"], field
    first = _verify_cli(settings)
    assert first.returncode == 0, first.stdout + first.stderr

    host.stop()
    host.join(30)
    # Tamper with one row by hand: verify-audit fails and names it.
    with store.transaction() as con:
        con.execute("UPDATE audit_log SET job_id = 'c-tampered' WHERE seq = ?", [row["seq"]])
    result = _verify_cli(settings)
    assert result.returncode == 1
    assert f"seq {row['seq']}" in result.stdout and "content does not match" in result.stdout
    # The payload column is DuckDB's view of the hashed raw bytes: an edit shows too.
    with store.transaction() as con:
        con.execute("UPDATE audit_log SET job_id = 'c-2' WHERE seq = ?", [row["seq"]])
        con.execute(
            """UPDATE audit_log SET payload = '{"owner": "mallory@example"}' WHERE seq = ?""",
            [row["seq"]],
        )
    result = _verify_cli(settings)
    assert result.returncode == 1
    assert f"seq {row['seq']}" in result.stdout and "payload does not match" in result.stdout
    # Restore, then delete a different row: the gap is reported.
    with store.transaction() as con:
        con.execute(
            f"UPDATE audit_log SET payload = ({audit.PAYLOAD_OF_RAW}) WHERE seq = ?", [row["seq"]]
        )
        con.execute("DELETE FROM audit_log WHERE seq = 7")
    result = _verify_cli(settings)
    assert result.returncode == 1 and "seq 8" in result.stdout and "missing" in result.stdout


def test_scenario_17_high_error_rate_raises_an_alert_logged_to_the_audit_trail(
    settings_factory: object, host_factory: object
) -> None:
    settings: Settings = settings_factory(health_min_events_for_rate=5)  # type: ignore[operator]
    store = Store(settings)
    store.ensure_schema()  # the file exists before anyone polls it
    loop = ConsumerLoop(ExplodingMetrics(settings), settings, store)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    orch = JobOrchestratorService(settings, wait=False)
    for i in range(10):
        orch.submit_job(f"ok-{i}", owner=OWNER, job_type="imaging")
    orch.submit_job("poison", owner=OWNER, job_type="imaging")
    orch.start_job("poison")
    orch.cancel_job("poison")
    orch.flush()
    wait_until(lambda: store.scalar("SELECT count(*) FROM dead_letters") == 3, what="3 errors")
    loop.stop()
    thread.join(30)  # its counters are flushed to health_signals on stop

    check_once(settings, store, Publisher(settings))
    _, alerts = store.query(
        "SELECT alert_id, value, threshold FROM health_alerts "
        "WHERE rule = 'handler_error_rate' AND subject = 'metrics'"
    )
    assert len(alerts) == 1 and alerts[0][1] > 0.2 and alerts[0][2] == 0.05
    # An open alert is not raised twice.
    check_once(settings, store, Publisher(settings))
    assert store.scalar("SELECT count(*) FROM health_alerts WHERE rule='handler_error_rate'") == 1

    host_factory(settings, ("compliance-auditor",))  # type: ignore[operator]
    wait_until(
        lambda: store.scalar(
            "SELECT count(*) FROM audit_log WHERE event_type = 'audit.record' "
            # Parenthesised: DuckDB 1.5 binds ->> looser than = and AND.
            "AND (payload->>'action') = 'health.alert.raised' "
            "AND (payload->'details'->>'alert_id') = ?",
            [alerts[0][0]],
        ),
        what="alert in the audit trail",
    )


def _old_event(job: str) -> bytes:
    return ev.encode(
        ev.new_event(
            ev.JobSubmitted,
            producer="archive-import",
            job_id=job,
            payload={"owner": OWNER, "job_type": "imaging"},
        )
    )


def test_scenario_15_and_18_retention_keeps_the_chain_and_the_report_is_compliant(
    settings: Settings, host_factory: Callable[..., Host], store: Store
) -> None:
    now = datetime.now(UTC)
    record_in_the_past(
        store,
        [(_old_event(f"old-{i}"), now - timedelta(days=100 + i)) for i in range(4)]
        + [(_old_event("recent-0"), now - timedelta(days=80))],
    )
    host = host_factory(settings)
    _lifecycle(settings, 3, prefix="new")
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM audit_log WHERE job_id IS NOT NULL") == 14,
        what="14 job records",
    )
    # Stopped first: a running auditor keeps recording the platform's own events (its
    # signed heads come back from audit-trail), and the totals below are compared exactly.
    host.stop()
    host.join(30)
    with store.reader() as con:
        before = build_report(con, settings)
    assert before["retention_compliant"] is False and before["expired_records"] == 4
    assert before["tables"]["audit_log"]["within_policy"] is False

    with store.transaction() as con:
        checkpoint = run_retention(con, settings)
    assert checkpoint["removed_count"] == 4 and checkpoint["signature"]
    _, jobs = store.query("SELECT DISTINCT job_id FROM audit_log WHERE job_id IS NOT NULL")
    assert [j for (j,) in jobs if j.startswith("old")] == []
    assert ("recent-0",) in jobs
    with store.reader() as con:
        assert audit.verify_store(con).ok
        report = build_report(con, settings)
    assert report["total_events"] == before["total_events"] - 4
    assert report["total_events"] == store.scalar("SELECT count(*) FROM audit_log")
    assert report["jobs_covered"] == 4
    assert report["retention_compliant"] is True
    assert report["retention_status"].startswith("compliant")
    assert all(t["within_policy"] for t in report["tables"].values())
    assert report["key_id"] and report["public_key"].startswith("-----BEGIN PUBLIC KEY")
    assert report["chain_verified"] is True
