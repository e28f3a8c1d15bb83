"""MetricsService: per-job rows (``job_events``, ``jobs``, ``job_metrics``) and a bounded
in-memory window of recent job metrics for live statistics."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from statistics import quantiles
from typing import Any

from horizons_platform.events import (
    JOB_METRICS,
    JOB_STARTED,
    JOB_STATUS_OF,
    JOB_SUBMITTED,
    TERMINAL_TYPES,
    EventDict,
)
from horizons_platform.kafka.records import Batch, Columns, Handler, Tables, now
from horizons_platform.services.base import job_event_columns, rows_to_columns, stored_elsewhere
from horizons_platform.store.tables import fold_job_updates
from horizons_platform.tracing import trace_id_of


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


def job_update(event: EventDict, updated_at: datetime) -> dict[str, Any]:
    """The ``jobs`` columns one lifecycle event sets (None = leave as is)."""
    p = event["payload"]
    kind = event["event_type"]
    occurred = event["occurred_at"]
    return {
        "job_id": event["job_id"],
        "status": JOB_STATUS_OF[kind],
        "owner": p.get("owner"),
        "job_type": p.get("job_type"),
        "submitted_at": occurred if kind == JOB_SUBMITTED else None,
        "started_at": occurred if kind == JOB_STARTED else None,
        "finished_at": occurred if kind in TERMINAL_TYPES else None,
        "last_event_id": event["event_id"],
        "updated_at": updated_at,
        "trace_id": trace_id_of(event["trace_id"]),
    }


def metrics_columns(events: list[Any], ingested_at: datetime) -> Columns:
    """The ``job_metrics`` columns of job.metrics events."""
    payloads = [e["payload"] for e in events]
    return {
        "event_id": [e["event_id"] for e in events],
        "job_id": [e["job_id"] for e in events],
        "job_type": [p["job_type"] for p in payloads],
        "outcome": [p["outcome"] for p in payloads],
        "duration_s": [p["duration_s"] for p in payloads],
        "queue_time_s": [p["queue_time_s"] for p in payloads],
        "cpu_hours": [p["cpu_hours"] for p in payloads],
        "bytes_processed": [p["bytes_processed"] for p in payloads],
        "peak_memory_mb": [p["peak_memory_mb"] for p in payloads],
        "occurred_at": [e["occurred_at"] for e in events],
        "ingested_at": [ingested_at] * len(events),
    }


class MetricsHandler(Handler):
    group = "metrics"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.window = MetricsWindow(settings.metrics_window_jobs, settings.metrics_window_s)
        self._last_clear = time.monotonic()

    def topics(self) -> list[str]:
        return [self.settings.topic_job_lifecycle, self.settings.topic_job_metrics]

    def handle(self, batch: Batch) -> Tables:
        stamp = now()
        known = [i for i, e in enumerate(batch.events) if e is not None]
        for i in known:
            event = batch.events[i]
            assert event is not None  # ``known`` holds the valid ones only
            kind = event["event_type"]
            if kind not in JOB_STATUS_OF and kind != JOB_METRICS:
                raise ValueError(f"metrics service cannot handle {kind!r} on {batch.topics[i]}")
        out: Tables = {"job_events": job_event_columns(batch, known, stamp)}
        lifecycle = [e for e in batch.events if e is not None and e["event_type"] in JOB_STATUS_OF]
        if lifecycle:
            folded = fold_job_updates([job_update(e, stamp) for e in lifecycle])
            out["jobs"] = rows_to_columns(folded)
        measured = [e for e in batch.events if e is not None and e["event_type"] == JOB_METRICS]
        if measured:
            out["job_metrics"] = metrics_columns(measured, stamp)
            seen = time.monotonic()
            for e in measured:
                p = e["payload"]
                self.window.add(
                    e["job_id"],
                    WindowEntry(
                        seen, p["job_type"], p["outcome"], p["duration_s"], p["queue_time_s"]
                    ),
                )
        return out

    def reused_ids(self, con: Any, batch: Batch) -> dict[int, str]:
        out = super().reused_ids(con, batch)
        return {**stored_elsewhere(con, batch, out), **out}

    def after_commit(self, rows: Tables) -> None:
        if time.monotonic() - self._last_clear > 10:
            self.window.clear_old_metrics()
            self._last_clear = time.monotonic()
