"""MetricsService: per-job rows (``job_events``, ``jobs``, ``job_metrics``) and a bounded
in-memory window of recent job metrics for live statistics."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from statistics import quantiles
from typing import Any

from horizons_platform.events import (
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_METRICS,
    JOB_STARTED,
    JOB_SUBMITTED,
    JobMetrics,
)
from horizons_platform.services.base import Handler, Output, Record, event_row, now

_STATUS = {
    JOB_SUBMITTED: "submitted",
    JOB_STARTED: "running",
    JOB_COMPLETED: "completed",
    JOB_FAILED: "failed",
    JOB_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class WindowEntry:
    seen_at: float
    job_type: str
    outcome: str
    duration_s: float
    queue_time_s: float


class MetricsWindow:
    """Recent job metrics, bounded by count and by age: memory stays flat forever."""

    def __init__(self, max_jobs: int, max_age_s: float) -> None:
        self.max_jobs = max_jobs
        self.max_age_s = max_age_s
        self._entries: OrderedDict[str, WindowEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, job_id: str, entry: WindowEntry) -> None:
        self._entries[job_id] = entry
        self._entries.move_to_end(job_id)
        if len(self._entries) > self.max_jobs:
            self._entries.popitem(last=False)

    def clear_old_metrics(self, now_s: float | None = None) -> int:
        """Drop entries older than the window; returns how many went."""
        cutoff = (time.monotonic() if now_s is None else now_s) - self.max_age_s
        dropped = 0
        while self._entries:
            _, oldest = next(iter(self._entries.items()))
            if oldest.seen_at >= cutoff:
                break
            self._entries.popitem(last=False)
            dropped += 1
        return dropped

    def summary(self) -> dict[str, Any]:
        durations = sorted(e.duration_s for e in self._entries.values())
        outcomes: dict[str, int] = {}
        for e in self._entries.values():
            outcomes[e.outcome] = outcomes.get(e.outcome, 0) + 1
        p50 = p95 = None
        if len(durations) >= 2:
            q = quantiles(durations, n=20, method="inclusive")
            p50, p95 = q[9], q[18]
        elif durations:
            p50 = p95 = durations[0]
        return {
            "jobs": len(durations),
            "outcomes": outcomes,
            "p50_duration_s": p50,
            "p95_duration_s": p95,
        }


def job_update(event: Any) -> dict[str, Any]:
    """The ``jobs`` columns one lifecycle event sets (None = leave as is)."""
    p = event.payload
    update: dict[str, Any] = {
        "job_id": event.job_id,
        "status": _STATUS[event.event_type],
        "owner": getattr(p, "owner", None),
        "job_type": getattr(p, "job_type", None),
        "last_event_id": str(event.event_id),
        "updated_at": now(),
    }
    if event.event_type == JOB_SUBMITTED:
        update["submitted_at"] = event.occurred_at
    elif event.event_type == JOB_STARTED:
        update["started_at"] = event.occurred_at
    else:
        update["finished_at"] = event.occurred_at
    return update


def metrics_row(event: JobMetrics) -> dict[str, Any]:
    p = event.payload
    return {
        "event_id": str(event.event_id),
        "job_id": event.job_id,
        "job_type": p.job_type,
        "outcome": p.outcome,
        "duration_s": p.duration_s,
        "queue_time_s": p.queue_time_s,
        "cpu_hours": p.cpu_hours,
        "bytes_processed": p.bytes_processed,
        "peak_memory_mb": p.peak_memory_mb,
        "occurred_at": event.occurred_at,
        "ingested_at": now(),
    }


class MetricsHandler(Handler):
    group = "metrics"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.window = MetricsWindow(settings.metrics_window_jobs, settings.metrics_window_s)
        self._last_clear = time.monotonic()

    def topics(self) -> list[str]:
        return [self.settings.topic_job_lifecycle, self.settings.topic_job_metrics]

    def handle(self, record: Record) -> Output:
        event: Any = record.event
        if event.event_type in _STATUS:
            return [("job_events", event_row(record, event)), ("jobs", job_update(event))]
        if event.event_type == JOB_METRICS:
            p = event.payload
            self.window.add(
                event.job_id,
                WindowEntry(time.monotonic(), p.job_type, p.outcome, p.duration_s, p.queue_time_s),
            )
            return [("job_events", event_row(record, event)), ("job_metrics", metrics_row(event))]
        raise ValueError(f"metrics service cannot handle {event.event_type!r} on {record.topic}")

    def after_commit(self, rows: Any) -> None:
        if time.monotonic() - self._last_clear > 10:
            self.window.clear_old_metrics()
            self._last_clear = time.monotonic()
