"""One W3C trace per job (issue 14): every event of a job carries the same trace id in
its Kafka headers (read with an outside client) and in every table that stores it."""

from __future__ import annotations

import json

from horizons_bench.smtp import SmtpSink
from horizons_platform.host import Host
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.tracing import trace_id_of
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import read_topic

OWNER = "ada@observatory.example"


def test_a_jobs_events_carry_one_trace_id_on_the_wire_and_in_every_table(
    settings: Settings, host: Host, smtp: SmtpSink
) -> None:
    orch = JobOrchestratorService(settings)
    orch.submit_job("traced-1", owner=OWNER, job_type="imaging")
    orch.start_job("traced-1")
    orch.complete_job("traced-1")
    orch.publish_metrics("traced-1", duration_s=12.0, queue_time_s=1.5)
    orch.submit_job("traced-2", owner=OWNER, job_type="imaging")

    messages = [
        m
        for topic in (settings.topic_job_lifecycle, settings.topic_job_metrics)
        for m in read_topic(settings, topic)
        if m.key() == b"traced-1"
    ]
    assert len(messages) == 4
    parents = [dict(m.headers())["traceparent"].decode() for m in messages]
    trace_ids = {trace_id_of(p) for p in parents}
    assert len(trace_ids) == 1 and None not in trace_ids
    assert len(set(parents)) == 4  # one span per event, one trace
    assert [json.loads(m.value())["trace_id"] for m in messages] == parents
    trace_id = trace_ids.pop()
    other = {
        trace_id_of(dict(m.headers())["traceparent"].decode())
        for m in read_topic(settings, settings.topic_job_lifecycle)
        if m.key() == b"traced-2"
    }
    assert other and trace_id not in other  # another job, another trace

    store = Store(settings)
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM notifications WHERE job_id = 'traced-1'"),
        30,
        what="the completion's notification",
    )
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM audit_log WHERE job_id = 'traced-1'") == 4,
        30,
        what="the auditor",
    )
    found = {
        table: store.scalar(
            f"SELECT count(*) FROM {table} WHERE trace_id = ? AND job_id = 'traced-1'", [trace_id]
        )
        for table in ("job_events", "audit_log", "jobs", "notifications")
    }
    assert found == {"job_events": 4, "audit_log": 4, "jobs": 1, "notifications": 1}, found
    # A restarted orchestrator continues the job's trace.
    JobOrchestratorService(settings).start_job("traced-2")
    continued = [
        trace_id_of(dict(m.headers())["traceparent"].decode())
        for m in read_topic(settings, settings.topic_job_lifecycle)
        if m.key() == b"traced-2"
    ]
    assert len(continued) == 2 and set(continued) == other
