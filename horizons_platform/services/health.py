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
from horizons_platform.services.base import Handler, Output, Record, now

_SIGNALS = {
    JOB_FAILED: "job_failed",
    CONSUMER_STARTED: "consumer_started",
    CONSUMER_STOPPED: "consumer_stopped",
    CONSUMER_BROKER_LOST: "consumer_broker_lost",
}


class HealthHandler(Handler):
    group = "system-health"

    def topics(self) -> list[str]:
        return [self.settings.topic_system_health, self.settings.topic_job_lifecycle]

    def handle(self, record: Record) -> Output:
        event: Any = record.event
        metric = _SIGNALS.get(event.event_type)
        if metric is None:
            return []
        group = getattr(event.payload, "consumer_group", None)
        return [
            (
                "health_signals",
                {
                    "observed_at": now(),
                    "source": f"event:{event.event_type}",
                    "consumer_group": group,
                    "topic": record.topic,
                    "partition": record.partition,
                    "metric": metric,
                    "value": 1.0,
                },
            )
        ]
