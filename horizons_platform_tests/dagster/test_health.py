"""health_status, the threshold checks, health_alert_job and the sensors, against a real
broker: lag and dead-letter rates are made real by publishing without (or with broken)
consumers, never by faking measurements."""

from collections.abc import Callable
from typing import Any

import dagster as dg

from horizons_platform import events as ev
from horizons_platform.defs import health
from horizons_platform.host import Host
from horizons_platform.kafka.producer import Publisher
from horizons_platform.services import health_rules as rules
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.dagster.conftest import (
    caught_up,
    check_results,
    resources,
    run_job,
)
from horizons_platform_tests.support import read_topic

OWNER = "karl@observatory.example"
ONE_PARTITION = {
    f"partitions_{t}": 1 for t in ("job_lifecycle", "job_metrics", "audit_trail", "system_health")
}
NO_MONITOR = ("notifications", "compliance-auditor", "metrics")  # sensors alone raise alerts


def _tick(sensor: Any, settings: Settings, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    with dg.build_sensor_context(
        instance=instance, resources=resources(settings), sensor_name=sensor.name
    ) as context:
        data = sensor.evaluate_tick(context)
    return list(data.run_requests or [])


def thresholds(settings: Settings) -> dict[str, dg.AssetCheckResult]:
    """The three threshold checks, invoked directly (one measurement of the system)."""
    res = resources(settings)
    results = health.health_thresholds(duckdb=res["duckdb"], settings=res["settings"])
    return {r.check_name: r for r in results}


def _alerts(store: Store) -> dict[tuple[str, str], bool]:
    """(rule, subject) → open?"""
    _, rows = store.query("SELECT rule, subject, resolved_at IS NULL FROM health_alerts")
    return {(r, s): bool(o) for r, s, o in rows}


def _published(settings: Settings, topic: str, event_type: str) -> list[bytes]:
    return [
        m.value()
        for m in read_topic(settings, topic)
        if dict(m.headers() or []).get("event_type") == event_type.encode()
    ]


def _backlog(settings: Settings, jobs: int) -> None:
    orch = JobOrchestratorService(settings, recover=False)
    for i in range(jobs):
        orch.submit_job(f"lag-{i}", owner=OWNER, job_type="imaging")
        orch.start_job(f"lag-{i}")
        orch.complete_job(f"lag-{i}")


def test_health_status_and_checks_pass_on_a_healthy_system(
    settings: Settings, host: Host, instance: dg.DagsterInstance
) -> None:
    _backlog(settings, 3)
    caught_up(settings)
    result = dg.materialize(
        [health.health_status, health.health_thresholds],
        instance=instance,
        resources=resources(settings),
    )
    [mat] = result.asset_materializations_for_node("health_status")
    assert "consumer_lag_messages" in mat.metadata["evaluations"].value
    assert mat.metadata["healthy"].value is True
    assert set(check_results(result)) == set(health.HEALTH_CHECKS)
    assert all(e.passed for e in check_results(result).values())
    # Nothing to raise: both sensors skip.
    for sensor in (health.consumer_lag_sensor, health.error_rate_sensor):
        with dg.build_sensor_context(
            instance=instance, resources=resources(settings), sensor_name=sensor.name
        ) as context:
            skip = sensor(context)
        assert isinstance(skip, dg.SkipReason) and "within thresholds" in str(skip.skip_message)


def test_lag_over_threshold_fails_check_and_sensor_raises_once_then_recovers(
    settings_factory: Callable[..., Settings],
    host_factory: Callable[..., Host],
    instance: dg.DagsterInstance,
) -> None:
    # One partition per topic: measuring lag in seconds probes each lagging partition.
    settings = settings_factory(health_lag_messages_threshold=5, **ONE_PARTITION)
    store = Store(settings)
    store.ensure_schema()
    _backlog(settings, 4)  # 12 lifecycle events, nobody consuming yet

    checks = thresholds(settings)
    lag = checks["consumer_lag_under_threshold"]
    assert not lag.passed and lag.severity == dg.AssetCheckSeverity.WARN
    assert "above threshold 5" in (lag.description or "")
    assert checks["error_rate_under_threshold"].passed

    requests = _tick(health.consumer_lag_sensor, settings, instance)
    keys = sorted(r.run_key for r in requests)
    assert keys == [f"raise:consumer_lag_messages:{g}:0" for g in sorted(health_groups())]
    # The error-rate sensor sees nothing to do.
    assert _tick(health.error_rate_sensor, settings, instance) == []

    first = requests[0]
    result = run_job(settings, "health_alert_job", instance, run_config=first.run_config)
    assert result.output_for_node(health.ALERT_OP) == {"raised": 1, "resolved": 0}
    subject = first.tags["horizons/subject"]
    assert _alerts(store) == {("consumer_lag_messages", subject): True}
    # An open alert is not requested again; the others keep their run keys.
    again = {r.run_key for r in _tick(health.consumer_lag_sensor, settings, instance)}
    assert first.run_key not in again and again == set(keys) - {first.run_key}
    # The default config raises every remaining breach; a second run raises nothing.
    assert (
        run_job(settings, "health_alert_job", instance).output_for_node(health.ALERT_OP)["raised"]
        == len(keys) - 1
    )
    assert run_job(settings, "health_alert_job", instance).output_for_node(health.ALERT_OP) == {
        "raised": 0,
        "resolved": 0,
    }
    assert _tick(health.consumer_lag_sensor, settings, instance) == []
    alerts = _published(settings, settings.topic_system_health, ev.HEALTH_ALERT)
    assert len(alerts) == len(keys)
    audit = _published(settings, settings.topic_audit_trail, ev.AUDIT_RECORD)
    assert sum(b"health.alert.raised" in a for a in audit) == len(keys)

    # Consumers (without the monitor, so the sensor is the one to notice) drain the lag.
    host_factory(settings, NO_MONITOR)
    wait_until(
        lambda: (
            {
                r.tags["horizons/subject"]
                for r in _tick(health.consumer_lag_sensor, settings, instance)
            }
            == set(NO_MONITOR)
        ),
        timeout=30,
        what="recovery requests for the three drained groups",
    )
    for request in _tick(health.consumer_lag_sensor, settings, instance):
        assert request.run_key.startswith("resolve:")
        run_job(settings, "health_alert_job", instance, run_config=request.run_config)
    still_open = {s for (_, s), is_open in _alerts(store).items() if is_open}
    assert still_open == {"system-health"}  # nobody consumes for that group
    recovered = _published(settings, settings.topic_system_health, ev.HEALTH_RECOVERED)
    assert len(recovered) == 3


def health_groups() -> list[str]:
    return ["compliance-auditor", "metrics", "notifications", "system-health"]


def test_dead_letter_rate_breach_fails_check_and_error_rate_sensor_raises(
    settings_factory: Callable[..., Settings],
    host_factory: Callable[..., Host],
    instance: dg.DagsterInstance,
) -> None:
    settings = settings_factory(**ONE_PARTITION)
    host_factory(settings, NO_MONITOR)
    publisher = Publisher(settings)
    for i in range(30):
        publisher.send(settings.topic_job_lifecycle, b"\x00not json %d" % i, key=f"bad-{i}")
    store = Store(settings)
    wait_until(
        lambda: (
            store.scalar("SELECT count(DISTINCT consumer_group) FROM dead_letters")
            == len(NO_MONITOR)
        ),
        what="dead letters from every running group",
    )
    wait_until(
        lambda: (
            (store.scalar("SELECT sum(value) FROM health_signals WHERE metric='dead_letters'") or 0)
            >= 30 * len(NO_MONITOR)
        ),
        what="dead-letter counts flushed to health_signals",
    )
    checks = thresholds(settings)
    assert not checks["dead_letter_rate_under_threshold"].passed
    assert checks["dead_letter_rate_under_threshold"].severity == dg.AssetCheckSeverity.ERROR

    requests = _tick(health.error_rate_sensor, settings, instance)
    assert {(r.tags["horizons/rule"], r.tags["horizons/subject"]) for r in requests} == {
        (rules.DEAD_LETTER_RATE, g) for g in NO_MONITOR
    }
    for request in requests:
        run_job(settings, "health_alert_job", instance, run_config=request.run_config)
    assert _tick(health.error_rate_sensor, settings, instance) == []
    assert all(_alerts(store).values()) and len(_alerts(store)) == 3
    # Scenario 17: each alert is logged to the audit trail — and the auditor stores it.
    wait_until(
        lambda: (
            store.scalar(
                "SELECT count(*) FROM audit_log WHERE event_type = 'audit.record' "
                "AND payload LIKE '%health.alert.raised%'"
            )
            == 3
        ),
        what="the alerts' audit records in audit_log",
    )


@dg.op(config_schema={"fail": bool})
def _maybe_fail(context: dg.OpExecutionContext) -> None:
    if context.op_config["fail"]:
        raise RuntimeError("injected failure")


@dg.job(name="flaky_job")
def _flaky_job() -> None:
    _maybe_fail()


def _run_flaky(instance: dg.DagsterInstance, fail: bool) -> dg.ExecuteInProcessResult:
    return _flaky_job.execute_in_process(
        run_config={"ops": {"_maybe_fail": {"config": {"fail": fail}}}},
        instance=instance,
        raise_on_error=False,
    )


def test_run_failure_sensor_alerts_and_success_resolves(
    settings: Settings, store: Store, instance: dg.DagsterInstance
) -> None:
    failed = _run_flaky(instance, fail=True)
    assert not failed.success
    with dg.build_run_status_sensor_context(
        sensor_name="run_failure_sensor",
        dagster_event=failed.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=failed.dagster_run,
        resources=resources(settings),
    ) as context:
        health.run_failure_sensor(context.for_run_failure())
        # A second failure while the alert is open: audited again, not alerted again.
        health.run_failure_sensor(context.for_run_failure())
    assert _alerts(store) == {(health.RUN_FAILED, "flaky_job"): True}
    audit = _published(settings, settings.topic_audit_trail, ev.AUDIT_RECORD)
    assert sum(b"dagster.run.failed" in a and failed.run_id.encode() in a for a in audit) == 2
    assert len(_published(settings, settings.topic_system_health, ev.HEALTH_ALERT)) == 1

    ok = _run_flaky(instance, fail=False)
    with dg.build_run_status_sensor_context(
        sensor_name="run_recovery_sensor",
        dagster_event=ok.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=ok.dagster_run,
        resources=resources(settings),
    ) as success:
        health.run_recovery_sensor(success)
    assert _alerts(store) == {(health.RUN_FAILED, "flaky_job"): False}
    assert len(_published(settings, settings.topic_system_health, ev.HEALTH_RECOVERED)) == 1
