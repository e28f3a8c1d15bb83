"""Scenarios 6–10: bad handlers, broker loss, corrupt and invalid events, bursts."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from horizons_bench.harness import free_port_block
from horizons_bench.smtp import SmtpSink
from horizons_platform.host import Host
from horizons_platform.kafka.admin import ensure_topics
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.kafka.consumer import EXIT_BROKER_LOST, ConsumerLoop
from horizons_platform.kafka.producer import Publisher
from horizons_platform.kafka.records import Batch, Tables
from horizons_platform.services.metrics import MetricsHandler
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import read_topic, start_consumer, unique_topics

OWNER = "jocelyn@observatory.example"


def _rows(store: Store, sql: str, params: list[object] | None = None) -> list[tuple]:
    return store.query(sql, params)[1]


class ExplodingMetrics(MetricsHandler):
    """The real metrics handler, except that it throws on one job (a handler bug)."""

    def handle(self, batch: Batch) -> Tables:
        if any(e is not None and e["job_id"] == "poison" for e in batch.events):
            raise RuntimeError("handler bug: cannot process poison")
        return super().handle(batch)


def test_scenario_6_a_throwing_handler_does_not_stop_the_consumer(
    settings: Settings, store: Store
) -> None:
    loop = ConsumerLoop(ExplodingMetrics(settings), settings, store)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        orch = JobOrchestratorService(settings)
        orch.submit_job("before", owner=OWNER, job_type="imaging")
        orch.submit_job("poison", owner=OWNER, job_type="imaging")
        orch.start_job("poison")
        orch.submit_job("after", owner=OWNER, job_type="imaging")
        wait_until(
            lambda: _rows(store, "SELECT count(*) FROM dead_letters")[0][0] == 2,
            what="two dead letters",
        )
        wait_until(
            lambda: {r[0] for r in _rows(store, "SELECT job_id FROM jobs")} == {"before", "after"},
            what="the good jobs",
        )
        assert thread.is_alive()
        # The loop keeps consuming after the errors.
        orch.start_job("after")
        wait_until(
            lambda: _rows(store, "SELECT status FROM jobs WHERE job_id='after'") == [("running",)],
            what="later event processed",
        )
        letters = _rows(
            store, "SELECT consumer_group, error_class, error_message FROM dead_letters"
        )
        assert {(g, c) for g, c, _ in letters} == {("metrics", "RuntimeError")}
        assert all("poison" in m for _, _, m in letters)
        dlq = read_topic(settings, settings.topic_dlq)
        assert len(dlq) == 2
        headers = dict(dlq[0].headers())
        assert headers["error_class"] == b"RuntimeError"
        assert headers["consumer_group"] == b"metrics"
        assert headers["original_topic"] == settings.topic_job_lifecycle.encode()
        assert {"original_partition", "original_offset", "error_message"} <= set(headers)
    finally:
        loop.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_scenario_7_broker_loss_detected_consumers_shut_down_cleanly(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    # A broker of its own, so stopping it does not disturb other tests.
    port = free_port_block(2)  # restarted on the same ports: outside the ephemeral range
    s = Settings(
        var_dir=tmp_path,
        broker_port=port,
        broker_controller_port=port + 1,
        **unique_topics(),
    )  # type: ignore[arg-type]
    broker = EmbeddedBroker(s)
    broker.start(progress=lambda _: None)
    log_path = tmp_path / "consume.log"
    # The embedded broker's port, not a bootstrap: s.kafka_bootstrap is unset.
    proc = start_consumer(
        s, log_path, broker_port=s.broker_port, broker_grace_s=4, smtp_port=smtp.port
    )
    try:
        wait_until(
            lambda: log_path.read_text().count("assigned") >= len(SERVICE_GROUPS),
            timeout=60,
            what="consumers assigned",
        )
        stopping = time.monotonic()
        broker.stop()
        # The host is timed from the broker's exit: the JVM's own shutdown took up to its
        # 30 s SIGKILL fallback in some CI runs (a broker with no clients at all too).
        gone = time.monotonic()
        code = proc.wait(timeout=90)
        rode_out, took = time.monotonic() - stopping, time.monotonic() - gone
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()
    out = log_path.read_text()
    assert code == EXIT_BROKER_LOST, out[-3000:]
    # It rode out the 4 s grace period, then stopped on its own — no hang.
    assert rode_out >= 4, f"exited {rode_out:.1f}s after the broker began stopping"
    assert took < 45, f"exited {took:.1f}s after the broker was gone"
    assert "broker unreachable" in out
    for group in SERVICE_GROUPS:
        assert f"{group}: consumer closed (exit" in out, f"{group} did not close cleanly"
    store = Store(Settings(var_dir=tmp_path))
    assert (
        _rows(
            store,
            "SELECT count(*) FROM health_signals WHERE metric = 'broker_reachable' AND value = 0",
        )[0][0]
        >= 1
    )


def _send_raw(settings: Settings, value: bytes, key: str) -> None:
    Publisher(settings).send(settings.topic_job_lifecycle, value, key=key)


def test_scenario_8_corrupted_json_is_dead_lettered_and_no_notification_sent(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    _send_raw(
        settings, b'{"event_id": "123", "event_type": "job.completed", "job_id": "cor', "corrupt"
    )
    orch = JobOrchestratorService(settings)  # a valid job afterwards is still processed
    orch.submit_job("ok-8", owner=OWNER, job_type="imaging")
    orch.cancel_job("ok-8")
    wait_until(lambda: smtp.for_job("ok-8"), what="the valid job's e-mail")
    groups = {"notifications", "compliance-auditor", "metrics", "system-health"}
    wait_until(
        lambda: {r[0] for r in _rows(store, "SELECT consumer_group FROM dead_letters")} == groups,
        what="dead letters from every lifecycle consumer",
    )
    letters = _rows(store, "SELECT error_class, error_message, raw FROM dead_letters")
    assert all(c == "EventDecodeError.malformed" for c, _, _ in letters)
    assert all(raw.startswith(b'{"event_id": "123"') for _, _, raw in letters)
    assert not smtp.for_job("cor")
    assert _rows(store, "SELECT count(*) FROM notifications WHERE job_id LIKE 'cor%'")[0][0] == 0
    flagged = _rows(
        store, "SELECT valid, validation_error, raw IS NOT NULL FROM audit_log WHERE NOT valid"
    )
    assert flagged and flagged[0][0] is False and flagged[0][2] is True
    assert len(read_topic(settings, settings.topic_dlq)) == 4


def test_scenario_9_missing_required_fields_rejected_by_every_consumer_yet_audited(
    settings: Settings, host: Host, smtp: SmtpSink, store: Store
) -> None:
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": "job.completed",
        "job_id": "nofields",
        "occurred_at": datetime.now(UTC).isoformat(),
        "producer": "test",
        "schema_version": 1,
        "payload": {"job_type": "imaging"},  # owner missing
    }
    _send_raw(settings, json.dumps(event).encode(), "nofields")
    groups = {"notifications", "compliance-auditor", "metrics", "system-health"}
    wait_until(
        lambda: {r[0] for r in _rows(store, "SELECT consumer_group FROM dead_letters")} == groups,
        what="every consumer rejected it",
    )
    reasons = {r[0] for r in _rows(store, "SELECT error_message FROM dead_letters")}
    assert reasons == {"payload.owner: Field required"}, "consumers disagree on the reason"
    audited = _rows(
        store,
        "SELECT valid, validation_error, event_id, job_id FROM audit_log WHERE job_id = 'nofields'",
    )
    assert audited == [(False, "payload.owner: Field required", event["event_id"], "nofields")]
    assert _rows(store, "SELECT count(*) FROM jobs WHERE job_id = 'nofields'")[0][0] == 0
    assert not smtp.for_job("nofields")


def test_scenario_10_burst_raises_lag_and_the_monitor_alerts(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host], store: Store
) -> None:
    settings = settings_factory(health_lag_messages_threshold=500)
    monitor_host = host_factory(settings, ("system-health",))
    # A burst while the metrics service is not running: its lag builds up.
    publisher = Publisher(settings)
    orch = JobOrchestratorService(settings, publisher, wait=False)
    for i in range(400):
        job = f"burst-{i}"
        orch.submit_job(job, owner=OWNER, job_type="imaging")
        orch.start_job(job)
    orch.flush()
    alert = wait_until(
        lambda: _rows(
            store,
            "SELECT alert_id, value, threshold FROM health_alerts "
            "WHERE rule = 'consumer_lag_messages' AND subject = 'metrics'",
        ),
        timeout=30,
        what="lag alert for the metrics group",
    )
    assert alert[0][1] > 500 and alert[0][2] == 500
    # The host comes back with the metrics service, drains the burst, and the monitor
    # records the recovery (one host owns the store: the services run in it together).
    monitor_host.stop()
    assert monitor_host.join(30) == 0
    ticks = monitor_host.monitor.ticks if monitor_host.monitor else 0
    host_factory(settings, ("system-health", "metrics"))
    wait_until(
        lambda: (
            _rows(store, "SELECT resolved_at FROM health_alerts WHERE alert_id = ?", [alert[0][0]])[
                0
            ][0]
            is not None
        ),
        timeout=60,
        what="recovery",
    )
    assert _rows(store, "SELECT count(*) FROM jobs")[0][0] == 400
    kinds = [
        dict(m.headers())["event_type"] for m in read_topic(settings, settings.topic_system_health)
    ]
    assert b"health.alert" in kinds and b"health.recovered" in kinds
    assert ticks > 0


def test_host_rejects_unknown_service(settings: Settings) -> None:
    try:
        Host(settings, ("nope",))
    except ValueError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("unknown service accepted")
    ensure_topics(settings)


def test_a_host_stopped_while_joining_its_groups_leaves_at_once(settings: Settings) -> None:
    """SIGTERM right after a start (a supervisor changing its mind, a test that found
    everything already stored): the consumers never get partitions, and the host must
    not wait out the readiness timeout before it leaves. The stop lands before the loops
    run, the one moment where that is certain; anywhere later in the start is the same
    case when the loops lose the race."""
    host = Host(settings)
    host.stop()  # what the SIGTERM handler does
    assert host.start()
    started = time.monotonic()
    assert not host.wait_ready(60)
    waited = time.monotonic() - started
    assert host.join(settings.shutdown_timeout_s) == 0
    assert waited < 5, f"wait_ready took {waited:.1f}s after the stop"
    assert time.monotonic() - started < 20
