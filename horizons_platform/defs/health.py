"""Health: the health_status asset, threshold checks, health_alert_job and the sensors.

Nothing here judges health itself. :mod:`horizons_platform.runtime.monitor` measures
(``collect_snapshot``) and records (``apply_evaluations``), and
:mod:`horizons_platform.services.health_rules` judges — the same functions the
SystemHealthMonitor in the consumer host calls, so the sensors and the monitor agree,
and whichever of them sees a breach first raises the alert, once.
"""

import socket
from collections.abc import Iterator
from typing import Any

import dagster as dg

from horizons_platform import events as ev
from horizons_platform.defs.ingest import dead_letters, health_signals
from horizons_platform.defs.resources import (
    DUCKDB_POOL,
    DuckDBStore,
    HorizonsSettings,
    KafkaPublisher,
)
from horizons_platform.runtime.monitor import apply_evaluations, collect_snapshot, lag_signal_rows
from horizons_platform.services import health_rules as rules
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store

HEALTH_GROUP = "health"
SENSOR_INTERVAL_S = 15
# Not a threshold rule: raised by run_failure_sensor, resolved by the job's next success.
RUN_FAILED = "dagster_run_failed"
ALERT_OP = "raise_health_alerts"


def _evaluate(
    settings: Settings, store: Store, only: tuple[str, ...] | None
) -> tuple[list[rules.Evaluation], list[dict[str, Any]]]:
    snap, lags = collect_snapshot(settings, store)
    evaluations = rules.evaluate(snap, rules.Thresholds.from_settings(settings), only)
    return evaluations, lag_signal_rows(snap, lags)


def _evaluation_table(evaluations: list[rules.Evaluation]) -> str:
    lines = ["| rule | subject | value | threshold | breached |", "|---|---|---|---|---|"]
    for e in evaluations:
        breached = "**yes**" if e.breached else "no"
        lines.append(f"| {e.rule} | {e.subject} | {e.value:g} | {e.threshold:g} | {breached} |")
    return "\n".join(lines)


# --- the asset and its checks ----------------------------------------------------------


@dg.asset(
    deps=[health_signals, dead_letters],
    group_name=HEALTH_GROUP,
    kinds={"kafka", "duckdb"},
    owners=["team:horizons-platform"],
    automation_condition=dg.AutomationCondition.on_cron("*/5 * * * *"),
    description="Every health rule evaluated now: consumer lag (messages, seconds) per "
    "group, handler error and dead-letter rates, broker reachability, job failures, plus "
    "the open alerts. Read-only: alerts are raised by health_alert_job and the monitor.",
)
def health_status(duckdb: DuckDBStore, settings: HorizonsSettings) -> dg.MaterializeResult:
    store = duckdb.get()
    evaluations, _ = _evaluate(settings.get(), store, None)
    _, open_alerts = store.query(
        "SELECT rule, subject, severity, value, raised_at FROM health_alerts "
        "WHERE resolved_at IS NULL ORDER BY raised_at"
    )
    breached = [f"{e.rule}:{e.subject}" for e in evaluations if e.breached]
    metadata: dict[str, Any] = {
        "evaluations": dg.MetadataValue.md(_evaluation_table(evaluations)),
        "breached": ", ".join(breached) or "none",
        "open_alerts": len(open_alerts),
        "healthy": not breached,
    }
    # Lag per group as numbers: plotted by Dagster across materializations.
    for e in evaluations:
        if e.rule == rules.CONSUMER_LAG_MESSAGES:
            metadata[f"lag_messages {e.subject}"] = float(e.value)
        elif e.rule == rules.CONSUMER_LAG_SECONDS:
            metadata[f"lag_seconds {e.subject}"] = float(e.value)
    _, letters = store.query(
        'SELECT error_class, count(DISTINCT (topic, "partition", "offset")) FROM dead_letters '
        "GROUP BY ALL ORDER BY 2 DESC"
    )
    metadata["dead letters by error class"] = dg.MetadataValue.md(
        "| error class | messages |\n|---|---:|\n"
        + "\n".join(f"| {cls} | {n} |" for cls, n in letters)
        if letters
        else "none"
    )
    return dg.MaterializeResult(metadata=metadata)


HEALTH_CHECKS: dict[str, tuple[tuple[str, ...], dg.AssetCheckSeverity, str]] = {
    "consumer_lag_under_threshold": (
        rules.LAG_RULES,
        dg.AssetCheckSeverity.WARN,
        "Every consumer group's lag (messages and seconds) is under its threshold.",
    ),
    "error_rate_under_threshold": (
        (rules.HANDLER_ERROR_RATE,),
        dg.AssetCheckSeverity.ERROR,
        "Every consumer group's handler error rate is under its threshold.",
    ),
    "dead_letter_rate_under_threshold": (
        (rules.DEAD_LETTER_RATE,),
        dg.AssetCheckSeverity.ERROR,
        "Every consumer group's dead-letter rate is under its threshold.",
    ),
}


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=health_status.key, description=desc)
        for name, (_, _, desc) in HEALTH_CHECKS.items()
    ],
    description="Thresholds of the health rules, from one measurement of the live system.",
)
def health_thresholds(
    duckdb: DuckDBStore, settings: HorizonsSettings
) -> Iterator[dg.AssetCheckResult]:
    evaluations, _ = _evaluate(settings.get(), duckdb.get(), None)
    for name, (rule_names, severity, _) in HEALTH_CHECKS.items():
        relevant = [e for e in evaluations if e.rule in rule_names]
        breached = [e for e in relevant if e.breached]
        yield dg.AssetCheckResult(
            asset_key=health_status.key,
            check_name=name,
            passed=not breached,
            severity=severity,
            description="; ".join(e.message for e in breached) or None,
            metadata={
                "evaluations": dg.MetadataValue.md(_evaluation_table(relevant)),
                "worst": max((e.value for e in relevant), default=0.0),
            },
        )


# --- health_alert_job ------------------------------------------------------------------


class AlertConfig(dg.Config):
    rules: list[str] = list(rules.LAG_RULES + rules.ERROR_RULES + (rules.BROKER_UNREACHABLE,))
    subject: str | None = None  # limit to one subject (e.g. a consumer group)


@dg.op(name=ALERT_OP, pool=DUCKDB_POOL)
def raise_health_alerts(
    context: dg.OpExecutionContext,
    config: AlertConfig,
    duckdb: DuckDBStore,
    settings: HorizonsSettings,
    kafka: KafkaPublisher,
) -> dg.Output[dict[str, int]]:
    """Evaluate the rules now; raise new breaches and resolve recoveries (never twice)."""
    s = settings.get()
    store = duckdb.get()
    evaluations, signal_rows = _evaluate(s, store, tuple(config.rules))
    if config.subject is not None:
        evaluations = [e for e in evaluations if e.subject == config.subject]
    done = apply_evaluations(
        s,
        store,
        kafka.get(),
        evaluations,
        actor="dagster:health_alert_job",
        extra_rows=signal_rows,
    )
    for e in done.raise_:
        context.log.warning("raised %s", e.message)
    for _, e in done.resolve:
        context.log.info("recovered: %s", e.message)
    if not done:
        context.log.info("nothing to raise or resolve (already recorded or within thresholds)")
    counts = {"raised": len(done.raise_), "resolved": len(done.resolve)}
    return dg.Output(counts, metadata=counts)


@dg.job(
    description="Evaluate the health rules and record what changed: health.alert / "
    "health.recovered on system-health, a row in health_alerts, an audit record."
)
def health_alert_job() -> None:
    raise_health_alerts()


# --- sensors -----------------------------------------------------------------------------


def _alert_state(store: Store) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], int]]:
    """Open alerts by (rule, subject), and how many alerts each (rule, subject) ever had."""
    _, rows = store.query(
        "SELECT rule, subject, count(*), max(alert_id) FILTER (WHERE resolved_at IS NULL) "
        "FROM health_alerts GROUP BY ALL"
    )
    open_alerts = {(r, s): a for r, s, _, a in rows if a is not None}
    epochs = {(r, s): int(n) for r, s, n, _ in rows}
    return open_alerts, epochs


def breach_requests(
    settings: Settings, store: Store, rule_names: tuple[str, ...], sensor: str
) -> list[dg.RunRequest]:
    """One health_alert_job run per new breach or recovery.

    The run key names (rule, subject, alert epoch): while the run is queued the sensor
    asks again with the same key (Dagster drops it); after the alert resolves, the next
    breach has a new epoch and so a new run.
    """
    evaluations, _ = _evaluate(settings, store, rule_names)
    open_alerts, epochs = _alert_state(store)
    requests = []
    for e in evaluations:
        if e.breached and e.key not in open_alerts:
            key = f"raise:{e.rule}:{e.subject}:{epochs.get(e.key, 0)}"
        elif not e.breached and e.key in open_alerts:
            key = f"resolve:{e.rule}:{e.subject}:{open_alerts[e.key]}"
        else:
            continue
        requests.append(
            dg.RunRequest(
                run_key=key,
                run_config={
                    "ops": {ALERT_OP: {"config": {"rules": [e.rule], "subject": e.subject}}}
                },
                tags={
                    "horizons/rule": e.rule,
                    "horizons/subject": e.subject,
                    "horizons/sensor": sensor,
                },
            )
        )
    return requests


def _sensor_result(
    context: dg.SensorEvaluationContext,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    rule_names: tuple[str, ...],
) -> dg.SensorResult | dg.SkipReason:
    requests = breach_requests(
        settings.get(), duckdb.get(), rule_names, context.sensor_name or "sensor"
    )
    if not requests:
        return dg.SkipReason(f"{', '.join(rule_names)}: within thresholds, nothing to record")
    return dg.SensorResult(run_requests=requests)


@dg.sensor(
    job=health_alert_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Consumer lag (messages and seconds) per group against the health rules; "
    "launches health_alert_job on a new breach or a recovery.",
)
def consumer_lag_sensor(
    context: dg.SensorEvaluationContext, settings: HorizonsSettings, duckdb: DuckDBStore
) -> dg.SensorResult | dg.SkipReason:
    return _sensor_result(context, settings, duckdb, rules.LAG_RULES)


@dg.sensor(
    job=health_alert_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Handler error rate, dead-letter rate and job failures against the health "
    "rules; launches health_alert_job on a new breach or a recovery.",
)
def error_rate_sensor(
    context: dg.SensorEvaluationContext, settings: HorizonsSettings, duckdb: DuckDBStore
) -> dg.SensorResult | dg.SkipReason:
    return _sensor_result(context, settings, duckdb, rules.ERROR_RULES)


def _run_evaluation(job_name: str, failed: bool) -> rules.Evaluation:
    return rules.Evaluation(RUN_FAILED, job_name, 1.0 if failed else 0.0, 0.0, "warning", failed)


@dg.run_failure_sensor(
    name="run_failure_sensor",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A failed run raises a dagster_run_failed alert for its job (once while "
    "open) and writes an audit record of the failure.",
)
def run_failure_sensor(
    context: dg.RunFailureSensorContext,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> None:
    s = settings.get()
    run = context.dagster_run
    error = context.failure_event.message or "run failed"
    with kafka.session() as publisher:
        record = ev.new_event(
            ev.AuditRecord,
            producer=f"dagster:run_failure_sensor@{socket.gethostname()}",
            payload={
                "action": "dagster.run.failed",
                "actor": "dagster:run_failure_sensor",
                "details": {"run_id": run.run_id, "job": run.job_name, "error": error[:2000]},
            },
        )
        publisher.publish(s.topic_audit_trail, record, key=run.job_name)
        apply_evaluations(
            s,
            duckdb.get(),
            publisher,
            [_run_evaluation(run.job_name, failed=True)],
            actor="dagster:run_failure_sensor",
        )
    context.log.warning("run %s of %s failed: alert recorded", run.run_id, run.job_name)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    name="run_recovery_sensor",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A successful run resolves its job's open dagster_run_failed alert.",
)
def run_recovery_sensor(
    context: dg.RunStatusSensorContext,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> None:
    job = context.dagster_run.job_name
    store = duckdb.get()
    still_open = store.scalar(
        "SELECT count(*) FROM health_alerts WHERE rule = ? AND subject = ? AND resolved_at IS NULL",
        [RUN_FAILED, job],
    )
    if not still_open:
        return  # the common case: no transaction, no publisher
    with kafka.session() as publisher:
        apply_evaluations(
            settings.get(),
            store,
            publisher,
            [_run_evaluation(job, failed=False)],
            actor="dagster:run_recovery_sensor",
        )


ASSETS = [health_status]
CHECKS = [health_thresholds]
JOBS = [health_alert_job]
SENSORS = [consumer_lag_sensor, error_rate_sensor, run_failure_sensor, run_recovery_sensor]
