"""SystemHealthMonitor's handler: turns the health-relevant events it reads into
``health_signals`` rows (job failures, consumer start/stop/broker-lost reports).
Lag, rates and alerts are measured on a timer by :mod:`horizons_platform.runtime.monitor`."""

from __future__ import annotations

from typing import Any

from horizons_platform.events import (
    CONSUMER_BROKER_LOST,
    CONSUMER_STARTED,
    CONSUMER_STOPPED,
    JOB_FAILED,
)
from horizons_platform.kafka.records import Batch, Handler, Tables, now
from horizons_platform.services.base import rows_to_columns

_SIGNALS = {
    JOB_FAILED: "job_failed",
    CONSUMER_STARTED: "consumer_started",
    CONSUMER_STOPPED: "consumer_stopped",
    CONSUMER_BROKER_LOST: "consumer_broker_lost",
}
_WATCHED = frozenset(_SIGNALS)


class HealthHandler(Handler):
    group = "system-health"

    def topics(self) -> list[str]:
        return [self.settings.topic_system_health, self.settings.topic_job_lifecycle]

    def handle(self, batch: Batch) -> Tables:
        rows: list[dict[str, Any]] = []
        observed = now()
        for i in batch.where(_WATCHED):
            event: Any = batch.events[i]
            rows.append(
                {
                    "observed_at": observed,
                    "source": f"event:{event['event_type']}",
                    "consumer_group": event["payload"].get("consumer_group"),
                    "topic": batch.topics[i],
                    "partition": batch.partitions[i],
                    "metric": _SIGNALS[event["event_type"]],
                    "value": 1.0,
                }
            )
        return {"health_signals": rows_to_columns(rows)} if rows else {}
