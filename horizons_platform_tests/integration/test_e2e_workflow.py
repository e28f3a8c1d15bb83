"""Scenarios 1–5: job lifecycles through the real broker into every consumer."""

from __future__ import annotations

import time
from collections import defaultdict

from horizons_bench.smtp import SmtpSink
from horizons_platform.host import Host
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import read_topic

OWNER = "vera@observatory.example"


def _count(store: Store, sql: str, params: list[object] | None = None) -> int:
    return int(store.scalar(sql, params) or 0)  # type: ignore[call-overload]


def _audited(store: Store, job_id: str) -> list[str]:
    _, rows = store.query(
        "SELECT event_type FROM audit_log WHERE job_id = ? ORDER BY seq", [job_id]
    )
    return [r[0] for r in rows]


def test_scenario_1_full_lifecycle_reaches_all_consumers_within_5s(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    orch = JobOrchestratorService(settings)
    started = time.monotonic()
    orch.submit_job("j-1", owner=OWNER, job_type="imaging")
    orch.start_job("j-1", worker="node-07")
    orch.complete_job("j-1", output_bytes=1234)
    orch.publish_metrics("j-1", duration_s=12.5, queue_time_s=3.0, cpu_hours=0.2)

    def everything_arrived() -> bool:
        return (
            _count(store, "SELECT count(*) FROM job_events WHERE job_id = 'j-1'") == 4
            and _count(store, "SELECT count(*) FROM jobs WHERE job_id='j-1' AND status='completed'")
            == 1
            and _count(store, "SELECT count(*) FROM job_metrics WHERE job_id = 'j-1'") == 1
            and len(_audited(store, "j-1")) == 4
            and len(smtp.for_job("j-1")) == 1
            and _count(
                store,
                "SELECT count(*) FROM health_signals WHERE consumer_group = "
                "'system-health' AND metric = 'processed'",
            )
            > 0
        )

    wait_until(everything_arrived, timeout=5.0, interval=0.05, what="all four consumers")
    elapsed = time.monotonic() - started
    assert elapsed < 5.0
    # In lifecycle order (one key, one partition of job-lifecycle); job.metrics comes
    # on another topic, so Kafka promises nothing about where it falls among them.
    audited = _audited(store, "j-1")
    assert [t for t in audited if t != "job.metrics"] == [
        "job.submitted",
        "job.started",
        "job.completed",
    ]
    assert audited.count("job.metrics") == 1
    mail = smtp.for_job("j-1")[0]
    assert mail["To"] == OWNER and "completed" in str(mail["Subject"])


def test_scenario_2_completion_processed_by_metrics_notification_and_audit(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    orch = JobOrchestratorService(settings)
    orch.submit_job("j-2", owner=OWNER, job_type="calibration")
    orch.start_job("j-2")
    orch.complete_job("j-2")
    orch.publish_metrics("j-2", duration_s=60.0, queue_time_s=5.0, bytes_processed=10**9)

    wait_until(lambda: smtp.for_job("j-2"), what="completion e-mail")
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM job_metrics WHERE job_id='j-2'"),
        what="metrics row",
    )
    _, rows = store.query(
        "SELECT status, duration_s IS NOT NULL, queue_time_s IS NOT NULL "
        "FROM jobs WHERE job_id = 'j-2'"
    )
    assert rows == [("completed", True, True)]
    _, rows = store.query("SELECT kind, status, recipient FROM notifications WHERE job_id='j-2'")
    wait_until(
        lambda: store.query("SELECT 1 FROM notifications WHERE job_id='j-2' AND status='sent'")[1],
        what="sent status",
    )
    assert rows[0][0] == "completed" and rows[0][2] == OWNER
    _, rows = store.query("SELECT outcome, duration_s FROM job_metrics WHERE job_id = 'j-2'")
    assert rows == [("completed", 60.0)]
    assert "job.completed" in _audited(store, "j-2")


def test_scenario_3_failure_handled_by_every_consumer_and_raises_alert(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    orch = JobOrchestratorService(settings)
    orch.submit_job("j-3", owner=OWNER, job_type="correlation")
    orch.start_job("j-3")
    orch.fail_job("j-3", error="node preempted", exit_code=137)

    wait_until(lambda: smtp.for_job("j-3"), what="failure e-mail")
    assert "node preempted" in smtp.for_job("j-3")[0].get_payload()
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM jobs WHERE job_id='j-3' AND status='failed'"),
        what="jobs row failed",
    )
    wait_until(lambda: "job.failed" in _audited(store, "j-3"), what="audit record")
    wait_until(
        lambda: _count(
            store,
            "SELECT count(*) FROM health_alerts WHERE rule='job_failures' AND resolved_at IS NULL",
        ),
        what="job failure alert",
    )
    alerts = [
        m
        for m in read_topic(settings, settings.topic_system_health)
        if dict(m.headers() or []).get("event_type") == b"health.alert"
    ]
    assert any(b"job_failures" in m.value() for m in alerts)


def test_scenario_4_cancellation_reaches_every_subscriber(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    orch = JobOrchestratorService(settings)
    orch.submit_job("j-4", owner=OWNER, job_type="imaging")
    orch.cancel_job("j-4", reason="superseded", cancelled_by=OWNER)

    wait_until(lambda: smtp.for_job("j-4"), what="cancellation e-mail")
    assert "superseded" in smtp.for_job("j-4")[0].get_payload()
    wait_until(
        lambda: _count(
            store, "SELECT count(*) FROM jobs WHERE job_id='j-4' AND status='cancelled'"
        ),
        what="jobs row cancelled",
    )
    wait_until(lambda: "job.cancelled" in _audited(store, "j-4"), what="audit record")
    wait_until(
        lambda: _count(
            store,
            "SELECT count(*) FROM job_events WHERE job_id='j-4' AND event_type='job.cancelled'",
        ),
        what="job_events row",
    )
    # The health monitor subscribes to job-lifecycle too: its offsets cover the event.
    wait_until(
        lambda: (
            _count(
                store,
                "SELECT sum(next_offset) FROM consumer_offsets WHERE "
                "consumer_group='system-health' AND topic=?",
                [settings.topic_job_lifecycle],
            )
            >= 2
        ),
        what="health monitor offsets",
    )


def test_scenario_5_per_job_ordering(settings: Settings, host: Host, store: Store) -> None:
    orch = JobOrchestratorService(settings)
    jobs = [f"j-5-{i}" for i in range(3)]
    for step in ("submit", "start", "complete"):  # interleaved across the three jobs
        for job in jobs:
            if step == "submit":
                orch.submit_job(job, owner=OWNER, job_type="imaging")
            elif step == "start":
                orch.start_job(job)
            else:
                orch.complete_job(job)

    by_job: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for msg in read_topic(settings, settings.topic_job_lifecycle):
        by_job[msg.key().decode()].append(
            (msg.partition(), msg.offset(), dict(msg.headers())["event_type"].decode())
        )
    for job in jobs:
        events = by_job[job]
        assert len({p for p, _, _ in events}) == 1, f"{job} spread over partitions"
        assert [t for _, _, t in sorted(events)] == [
            "job.submitted",
            "job.started",
            "job.completed",
        ]
    wait_until(lambda: _count(store, "SELECT count(*) FROM job_events") == 9, what="9 job_events")
    _, rows = store.query('SELECT job_id, "partition", "offset", event_type FROM job_events')
    stored: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for job, part, off, etype in rows:
        stored[job].append((part, off, etype))
    for job in jobs:
        assert [t for _, _, t in sorted(stored[job])] == [
            "job.submitted",
            "job.started",
            "job.completed",
        ]
