"""SystemHealthMonitor's measuring side: lag, rates and broker reachability on a timer.

``collect_snapshot`` measures; :mod:`horizons_platform.services.health_rules` judges;
``apply_evaluations`` records raises/recoveries in ``health_alerts`` (one transaction,
so the monitor and a Dagster ``health_alert_job`` never raise the same alert twice),
with the ``health.alert`` / ``health.recovered`` events for ``system-health`` and their
audit records for ``audit-trail`` in the publication outbox (runtime/publications.py).
The Dagster sensors call the same three functions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import KafkaException

from horizons_platform import events as ev
from horizons_platform.ids import uuid7
from horizons_platform.kafka.admin import PartitionLag, group_lag, under_replicated
from horizons_platform.kafka.producer import Publisher
from horizons_platform.runtime.publications import enqueue, enqueue_audit, publish_now
from horizons_platform.services import health_rules as rules
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)


# Failed for good, or claimed and neither sent nor released for much longer than a send
# can take: both need a person.
UNDELIVERED_SQL = """
    SELECT count(*) FROM notifications
    WHERE status = 'failed'
       OR (status = 'sending' AND claimed_at < now() - INTERVAL {stale_s} SECOND)
"""


def stale_claim_s(settings: Settings) -> int:
    """A claim older than this was abandoned (the dispatcher re-claims after 2× less)."""
    return int(max(60.0, 6 * settings.smtp_timeout_s))


def collect_snapshot(
    settings: Settings, store: StoreBase
) -> tuple[rules.Snapshot, list[PartitionLag]]:
    snap = rules.Snapshot()
    lags: list[PartitionLag] = []
    try:
        lags = group_lag(settings, group_topics(settings), timeout=5.0)
        partitions = under_replicated(settings, list(settings.topic_partitions()))
        snap.under_replicated = len(partitions)
        if partitions:
            log.warning(
                "health: %d under-replicated partition(s): %s",
                len(partitions),
                ", ".join(partitions[:6]),
            )
    except (KafkaException, RuntimeError) as exc:
        log.warning("health: cannot measure lag, broker unreachable? %s", exc)
        snap.broker_reachable = False
    for lag in lags:
        snap.lag_messages[lag.group] = snap.lag_messages.get(lag.group, 0) + lag.lag
        snap.lag_seconds[lag.group] = max(snap.lag_seconds.get(lag.group, 0.0), lag.age_s)
    since = datetime.now(UTC) - timedelta(seconds=settings.health_window_s)
    with store.transaction() as con:
        rows = con.execute(
            """
            SELECT consumer_group, metric, sum(value) FROM health_signals
            WHERE observed_at >= ?
              AND metric IN ('processed', 'errors', 'dead_letters', 'job_failed')
            GROUP BY ALL
            """,
            [since],
        ).fetchall()
        snap.notifications_undelivered = float(
            con.execute(UNDELIVERED_SQL.format(stale_s=stale_claim_s(settings))).fetchall()[0][0]
        )
    for group, metric, total in rows:
        if metric == "job_failed":
            snap.job_failures += total
            continue
        counts = snap.counts.setdefault(group, rules.GroupCounts())
        setattr(counts, metric, total)
    return snap, lags


def lag_signal_rows(snap: rules.Snapshot, lags: list[PartitionLag]) -> list[dict[str, Any]]:
    now = datetime.now(UTC)

    def row(
        group: str | None, topic: str | None, part: int | None, metric: str, v: float
    ) -> dict[str, Any]:
        return {
            "observed_at": now,
            "source": "monitor",
            "consumer_group": group,
            "topic": topic,
            "partition": part,
            "metric": metric,
            "value": float(v),
        }

    out = [row(None, None, None, "broker_reachable", 1.0 if snap.broker_reachable else 0.0)]
    out.append(row(None, None, None, "under_replicated", snap.under_replicated))
    for group, messages in snap.lag_messages.items():
        out.append(row(group, None, None, "lag_messages", messages))
        out.append(row(group, None, None, "lag_seconds", snap.lag_seconds.get(group, 0.0)))
    for p in lags:
        if p.lag:
            out.append(row(p.group, p.topic, p.partition, "lag_messages", p.lag))
    return out


def apply_evaluations(
    settings: Settings,
    store: StoreBase,
    publisher: Publisher | None,
    evaluations: list[rules.Evaluation],
    *,
    actor: str = "system-health-monitor",
    extra_rows: list[dict[str, Any]] | None = None,
    stop: threading.Event | None = None,
) -> rules.Transitions:
    """Record what changed, with the ``health.alert`` / ``health.recovered`` events and
    their audit records in the publication outbox (same transaction), then publish them.
    Returns the transitions that were applied."""
    now = datetime.now(UTC)
    producer = f"{actor}@{socket.gethostname()}"
    with store.transaction() as con:
        open_rows = con.execute(
            "SELECT rule, subject, alert_id FROM health_alerts WHERE resolved_at IS NULL"
        ).fetchall()
        todo = rules.transitions(evaluations, {(r, s): a for r, s, a in open_rows})
        raised = [
            {
                "alert_id": str(uuid7()),
                "rule": e.rule,
                "severity": e.severity,
                "subject": e.subject,
                "value": e.value,
                "threshold": e.threshold,
                "message": e.message,
                "raised_at": now,
                "resolved_at": None,
                "resolved_value": None,
            }
            for e in todo.raise_
        ]
        tables.insert(con, "health_alerts", raised)
        for alert_id, e in todo.resolve:
            con.execute(
                "UPDATE health_alerts SET resolved_at = ?, resolved_value = ? WHERE alert_id = ?",
                [now, e.value, alert_id],
            )
        tables.insert(con, "health_signals", extra_rows or [])
        ids = _enqueue(con, settings, raised, todo.resolve, actor, producer)
    publish_now(store, publisher, ids, stop)
    for r in raised:
        log.warning("health alert: %s", r["message"])
    for _, e in todo.resolve:
        log.info("health recovered: %s", e.message)
    return todo


ALERT_FIELDS = ("alert_id", "rule", "severity", "subject", "value", "threshold", "message")


def _enqueue(
    con: Any,
    settings: Settings,
    raised: list[dict[str, Any]],
    resolved: list[tuple[str, rules.Evaluation]],
    actor: str,
    producer: str,
) -> list[str]:
    ids = []
    for r in raised:
        alert = ev.new_event(
            ev.HealthAlert, producer=producer, payload={k: r[k] for k in ALERT_FIELDS}
        )
        ids.append(enqueue(con, settings.topic_system_health, alert, key=r["subject"]))
        ids.append(enqueue_audit(con, settings, actor, "health.alert.raised", r, producer))
    for alert_id, e in resolved:
        recovered = ev.new_event(
            ev.HealthRecovered,
            producer=producer,
            payload={
                "alert_id": alert_id,
                "rule": e.rule,
                "subject": e.subject,
                "value": e.value,
                "threshold": e.threshold,
            },
        )
        ids.append(enqueue(con, settings.topic_system_health, recovered, key=e.subject))
        details = {"alert_id": alert_id, "rule": e.rule, "subject": e.subject, "value": e.value}
        ids.append(enqueue_audit(con, settings, actor, "health.alert.recovered", details, producer))
    return ids


def check_once(
    settings: Settings,
    store: StoreBase,
    publisher: Publisher | None,
    stop: threading.Event | None = None,
) -> rules.Transitions:
    snap, lags = collect_snapshot(settings, store)
    evaluations = rules.evaluate(snap, rules.Thresholds.from_settings(settings))
    return apply_evaluations(
        settings, store, publisher, evaluations, extra_rows=lag_signal_rows(snap, lags), stop=stop
    )


class HealthMonitor:
    """Runs ``check_once`` every ``health_interval_s`` inside the consumer host."""

    def __init__(
        self,
        settings: Settings,
        store: StoreBase,
        publisher: Publisher,
        stop_event: threading.Event,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.stop_event = stop_event
        self.ticks = 0
        self.host = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.health_interval_s):
            try:
                check_once(self.settings, self.store, self.publisher, self.stop_event)
                self.ticks += 1
            except Exception:
                log.exception("health: check failed; retrying next interval")
