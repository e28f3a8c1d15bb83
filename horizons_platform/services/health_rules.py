"""The health rules — pure functions, used by the SystemHealthMonitor and the Dagster sensors.

A snapshot of measurements goes in; one evaluation per (rule, subject) comes out; the
alert state machine turns evaluations plus the open alerts into raises and recoveries,
so an open alert is never raised twice and every recovery is seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from horizons_platform.settings import Settings

CONSUMER_LAG_MESSAGES = "consumer_lag_messages"
CONSUMER_LAG_SECONDS = "consumer_lag_seconds"
HANDLER_ERROR_RATE = "handler_error_rate"
DEAD_LETTER_RATE = "dead_letter_rate"
BROKER_UNREACHABLE = "broker_unreachable"
# Partitions of the platform's topics with fewer in-sync replicas than replicas (or no
# leader): the cluster lost or is rebuilding a node; one more loss may stop writes.
UNDER_REPLICATED = "under_replicated_partitions"
JOB_FAILURES = "job_failures"
# Notifications failed for good, or claimed and never finished (a stuck sender).
NOTIFICATIONS_UNDELIVERED = "notifications_undelivered"
# (A consumer group raises two rules of its own when it checks its stored offsets against
# the cluster: kafka/offsets.py, OFFSETS_INVALID and MESSAGES_LOST.)

LAG_RULES = (CONSUMER_LAG_MESSAGES, CONSUMER_LAG_SECONDS)
ERROR_RULES = (HANDLER_ERROR_RATE, DEAD_LETTER_RATE, JOB_FAILURES, NOTIFICATIONS_UNDELIVERED)


@dataclass(frozen=True)
class Thresholds:
    lag_messages: float
    lag_seconds: float
    error_rate: float
    dead_letter_rate: float
    min_events_for_rate: int
    job_failures: float

    @classmethod
    def from_settings(cls, s: Settings) -> Thresholds:
        return cls(
            lag_messages=s.health_lag_messages_threshold,
            lag_seconds=s.health_lag_seconds_threshold,
            error_rate=s.health_error_rate_threshold,
            dead_letter_rate=s.health_dead_letter_rate_threshold,
            min_events_for_rate=s.health_min_events_for_rate,
            job_failures=s.health_job_failures_threshold,
        )


@dataclass
class GroupCounts:
    processed: float = 0
    errors: float = 0
    dead_letters: float = 0


@dataclass
class Snapshot:
    """What the monitor measured. Lag is per consumer group (summed / worst partition)."""

    lag_messages: dict[str, float] = field(default_factory=dict)
    lag_seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, GroupCounts] = field(default_factory=dict)
    job_failures: float = 0
    notifications_undelivered: float = 0
    broker_reachable: bool = True
    under_replicated: int = 0


@dataclass(frozen=True)
class Evaluation:
    rule: str
    subject: str
    value: float
    threshold: float
    severity: str
    breached: bool
    detail: str = ""  # the whole message, where the numbers alone do not say enough

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule, self.subject)

    @property
    def message(self) -> str:
        if self.detail:
            return self.detail
        verb = "above" if self.breached else "within"
        return (
            f"{self.rule} for {self.subject} is {self.value:g}, {verb} threshold {self.threshold:g}"
        )


def evaluate(
    snap: Snapshot, th: Thresholds, rules: tuple[str, ...] | None = None
) -> list[Evaluation]:
    out: list[Evaluation] = []
    out.append(
        Evaluation(
            BROKER_UNREACHABLE,
            "kafka",
            0.0 if snap.broker_reachable else 1.0,
            0.0,
            "critical",
            not snap.broker_reachable,
        )
    )
    if snap.broker_reachable:  # unreachable: nothing is known about the replicas
        out.append(
            Evaluation(
                UNDER_REPLICATED,
                "kafka",
                float(snap.under_replicated),
                0.0,
                "warning",
                snap.under_replicated > 0,
            )
        )
    for group, lag in sorted(snap.lag_messages.items()):
        out.append(
            Evaluation(
                CONSUMER_LAG_MESSAGES, group, lag, th.lag_messages, "warning", lag > th.lag_messages
            )
        )
    for group, age in sorted(snap.lag_seconds.items()):
        out.append(
            Evaluation(
                CONSUMER_LAG_SECONDS, group, age, th.lag_seconds, "warning", age > th.lag_seconds
            )
        )
    for group, c in sorted(snap.counts.items()):
        enough = c.processed >= th.min_events_for_rate
        err = c.errors / c.processed if c.processed else 0.0
        dlq = c.dead_letters / c.processed if c.processed else 0.0
        out.append(
            Evaluation(
                HANDLER_ERROR_RATE,
                group,
                round(err, 4),
                th.error_rate,
                "critical",
                enough and err > th.error_rate,
            )
        )
        out.append(
            Evaluation(
                DEAD_LETTER_RATE,
                group,
                round(dlq, 4),
                th.dead_letter_rate,
                "warning",
                enough and dlq > th.dead_letter_rate,
            )
        )
    out.append(
        Evaluation(
            JOB_FAILURES,
            "jobs",
            snap.job_failures,
            th.job_failures,
            "warning",
            snap.job_failures > th.job_failures,
        )
    )
    out.append(
        Evaluation(
            NOTIFICATIONS_UNDELIVERED,
            "notifications",
            snap.notifications_undelivered,
            0.0,
            "warning",
            snap.notifications_undelivered > 0,
        )
    )
    if rules is not None:
        out = [e for e in out if e.rule in rules]
    return out


@dataclass(frozen=True)
class Transitions:
    raise_: list[Evaluation]
    resolve: list[tuple[str, Evaluation]]  # (alert_id, evaluation now within threshold)

    def __bool__(self) -> bool:
        return bool(self.raise_ or self.resolve)


def transitions(
    evaluations: list[Evaluation], open_alerts: dict[tuple[str, str], str]
) -> Transitions:
    """Raise breaches without an open alert; resolve open alerts now within threshold."""
    raise_ = [e for e in evaluations if e.breached and e.key not in open_alerts]
    resolve = [
        (open_alerts[e.key], e) for e in evaluations if not e.breached and e.key in open_alerts
    ]
    return Transitions(raise_, resolve)
