"""JobOrchestratorService: the publisher of job lifecycles, guarding the job state machine.

An illegal transition raises :class:`IllegalTransition` and publishes nothing. Every
call waits for the broker's acknowledgement and returns the delivery. On start the
service rebuilds job states from the ``job-lifecycle`` topic, so it survives restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from horizons_platform import events as ev
from horizons_platform import tracing
from horizons_platform.kafka.admin import watermarks
from horizons_platform.kafka.producer import Delivery, DeliveryError, Publisher
from horizons_platform.settings import Settings

log = logging.getLogger(__name__)

SUBMITTED, RUNNING, COMPLETED, FAILED, CANCELLED = (ev.JOB_STATUS_OF[t] for t in ev.LIFECYCLE_TYPES)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# event type → (states it may follow, state it leads to); None = job unknown.
TRANSITIONS: dict[str, tuple[frozenset[str | None], str]] = {
    ev.JOB_SUBMITTED: (frozenset({None}), SUBMITTED),
    ev.JOB_STARTED: (frozenset({SUBMITTED}), RUNNING),
    ev.JOB_COMPLETED: (frozenset({RUNNING}), COMPLETED),
    ev.JOB_FAILED: (frozenset({SUBMITTED, RUNNING}), FAILED),
    ev.JOB_CANCELLED: (frozenset({SUBMITTED, RUNNING}), CANCELLED),
}


# Finished jobs remembered (for their metrics and a clear "job … is completed" error):
# the newest ones only, so the orchestrator's memory does not grow with its history.
FINISHED_JOBS_KEPT = 10_000


class IllegalTransition(ValueError):
    pass


class RecoveryIncomplete(RuntimeError):
    """The job-lifecycle topic could not be read to its end: job states would be wrong."""


def next_state(current: str | None, event_type: str, job_id: str) -> str:
    allowed, target = TRANSITIONS[event_type]
    if current not in allowed:
        verb = event_type.split(".", 1)[1]
        if current is None:
            raise IllegalTransition(f"job {job_id} is unknown: cannot mark it {verb}")
        raise IllegalTransition(f"job {job_id} is {current}: cannot mark it {verb}")
    return target


class JobOrchestratorService:
    def __init__(
        self,
        settings: Settings,
        publisher: Publisher | None = None,
        *,
        recover: bool = True,
        wait: bool = True,
    ) -> None:
        """``wait=False`` pipelines sends (bulk simulation): call ``flush()`` to confirm."""
        self.settings = settings
        self.wait = wait
        self.publisher = publisher or Publisher(settings)
        self.producer_name = settings.producer_name
        self._jobs: dict[str, dict[str, Any]] = {}  # job_id → {state, owner, job_type, times}
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()  # newest last
        self.finished_jobs_kept = FINISHED_JOBS_KEPT
        self._lock = threading.Lock()
        if recover:
            self.recover()

    # --- state -------------------------------------------------------------------------

    def _job(self, job_id: str) -> dict[str, Any] | None:
        return self._jobs.get(job_id) or self._finished.get(job_id)

    def state(self, job_id: str) -> str | None:
        job = self._job(job_id)
        return job["state"] if job else None

    @property
    def jobs_in_memory(self) -> int:
        return len(self._jobs) + len(self._finished)

    def recover(self, timeout: float = 30.0) -> int:
        """Fold the job-lifecycle topic (up to its end offsets, read first) into job
        states; :class:`RecoveryIncomplete` if the end is not reached within ``timeout``."""
        consumer = Consumer(
            self.settings.kafka_config(
                **{"group.id": "horizons-orchestrator-recovery", "enable.auto.commit": False}
            )
        )
        try:
            topic = self.settings.topic_job_lifecycle
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                return 0
            ends: dict[int, int] = {}
            assign = []
            deadline = time.monotonic() + timeout
            for p in meta.partitions:
                low, high = watermarks(consumer, TopicPartition(topic, p), deadline)
                if high > low:
                    ends[p] = high
                    assign.append(TopicPartition(topic, p, low))
            consumer.assign(assign)
            seen = 0
            while ends and time.monotonic() < deadline:
                for msg in consumer.consume(1000, timeout=0.5):
                    partition, offset = msg.partition(), msg.offset()
                    if msg.error() or partition is None or offset is None:
                        continue
                    if offset + 1 >= ends.get(partition, 0):
                        ends.pop(partition, None)
                    try:
                        event = ev.decode(msg.value())
                    except ev.EventDecodeError:
                        continue
                    if event.event_type in TRANSITIONS:
                        self._fold(event)
                        seen += 1
            if ends:
                raise RecoveryIncomplete(
                    f"orchestrator: could not read {topic} to its end within {timeout:.0f}s "
                    f"(partitions {sorted(ends)} unread up to offsets "
                    f"{[ends[p] for p in sorted(ends)]}); job states would be incomplete, "
                    "so nothing is published — check the broker and try again"
                )
            log.info(
                "orchestrator: recovered %d jobs (%d live) from %d events",
                self.jobs_in_memory,
                len(self._jobs),
                seen,
            )
            return seen
        finally:
            consumer.close()

    def _fold(self, event: Any) -> None:
        _, target = TRANSITIONS[event.event_type]
        job = self._job(event.job_id)
        if job is None:
            job = self._jobs[event.job_id] = {}
        job["state"] = target
        job.setdefault("trace_id", tracing.trace_int(event.trace_id))
        job.setdefault("owner", getattr(event.payload, "owner", None))
        job.setdefault("job_type", getattr(event.payload, "job_type", None))
        job[target + "_at"] = event.occurred_at
        if target in TERMINAL:
            self._jobs.pop(event.job_id, None)
            self._finished[event.job_id] = job
            self._finished.move_to_end(event.job_id)
            while len(self._finished) > self.finished_jobs_kept:
                self._finished.popitem(last=False)

    # --- commands ----------------------------------------------------------------------

    def _publish(self, cls: type[ev.Envelope], job_id: str, **payload: Any) -> Delivery | None:
        with self._lock:
            current = self.state(job_id)
            next_state(current, cls.model_fields["event_type"].default, job_id)
            job = self._job(job_id) or {}
            payload.setdefault("owner", job.get("owner"))
            payload.setdefault("job_type", job.get("job_type"))
            event_type = cls.model_fields["event_type"].default
            trace_id = job.get("trace_id") or tracing.new_trace_id()  # one trace per job
            event = ev.new_event(
                cls,
                producer=self.producer_name,
                job_id=job_id,
                payload=payload,
                trace_id=tracing.event_traceparent(event_type, trace_id),
            )
            delivery = self._send(self.settings.topic_job_lifecycle, event)
            self._fold(event)
            return delivery

    def _send(self, topic: str, event: ev.Envelope) -> Delivery | None:
        if self.wait:
            return self.publisher.publish(topic, event)
        self.publisher.send_async(
            topic,
            ev.encode(event),
            key=event.job_id,
            headers=ev.headers_for(event),
            on_delivery=self._on_delivery,
        )
        self.publisher.poll(0)
        return None

    def _on_delivery(self, err: object, msg: object) -> None:
        if err is not None:
            self.failed_deliveries += 1

    failed_deliveries = 0

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for pipelined sends; raise if any was not acknowledged."""
        remaining = self.publisher.flush(timeout)
        if remaining or self.failed_deliveries:
            raise DeliveryError(
                f"{remaining} messages unacknowledged, {self.failed_deliveries} failed"
            )

    def submit_job(
        self,
        job_id: str,
        *,
        owner: str,
        job_type: str,
        priority: int = 0,
        params: dict[str, Any] | None = None,
    ) -> Delivery | None:
        return self._publish(
            ev.JobSubmitted,
            job_id,
            owner=owner,
            job_type=job_type,
            priority=priority,
            params=params or {},
        )

    def start_job(self, job_id: str, *, worker: str = "worker-1") -> Delivery | None:
        return self._publish(ev.JobStarted, job_id, worker=worker)

    def complete_job(self, job_id: str, *, output_bytes: int = 0) -> Delivery | None:
        return self._publish(ev.JobCompleted, job_id, output_bytes=output_bytes)

    def fail_job(self, job_id: str, *, error: str, exit_code: int | None = None) -> Delivery | None:
        return self._publish(ev.JobFailed, job_id, error=error, exit_code=exit_code)

    def cancel_job(
        self, job_id: str, *, reason: str = "", cancelled_by: str = ""
    ) -> Delivery | None:
        return self._publish(ev.JobCancelled, job_id, reason=reason, cancelled_by=cancelled_by)

    def publish_metrics(self, job_id: str, **metrics: Any) -> Delivery | None:
        """Send the job's metrics (after it finished) to ``job-metrics``."""
        job = self._job(job_id)
        if job is None or job["state"] not in TERMINAL:
            raise IllegalTransition(f"job {job_id} has not finished: no metrics yet")
        metrics.setdefault("job_type", job.get("job_type"))
        metrics.setdefault("outcome", job["state"])
        trace_id = job.get("trace_id") or tracing.new_trace_id()
        event = ev.new_event(
            ev.JobMetrics,
            producer=self.producer_name,
            job_id=job_id,
            payload=metrics,
            trace_id=tracing.event_traceparent(ev.JOB_METRICS, trace_id),
        )
        return self._send(self.settings.topic_job_metrics, event)
