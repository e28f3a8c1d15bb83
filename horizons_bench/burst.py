"""`horizons bench burst`: a burst on top of steady traffic — how high the lag rises,
how long it takes to drain, and when the health monitor raised (and cleared) its alert.

Phases: steady ``--rate`` for 10 s, ``--burst`` events flat out, steady again until
every group has drained. The host runs with ``HORIZONS_HEALTH_LAG_MESSAGES_THRESHOLD``
= ``--threshold`` and a 1 s health interval; alerts are read live from the
``system-health`` topic (their Kafka timestamps), then checked in ``health_alerts``.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from horizons_bench import references
from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.offsets import OffsetProbe
from horizons_bench.report import BenchResult, Figure
from horizons_bench.runner import Sample, Timeline, all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_bench.verify import verify
from horizons_bench.workload import Ledger, LedgerPublisher, produce_jobs
from horizons_platform import events as ev
from horizons_platform.services.health_rules import LAG_RULES
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.store.client import Store

STEADY_S = 10.0


@dataclass(frozen=True)
class AlertSeen:
    at: float  # Kafka timestamp, wall clock seconds
    event_type: str
    rule: str
    subject: str
    value: float


class AlertTail:
    """Reads health.alert / health.recovered from system-health as they are published."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[AlertSeen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-tail", daemon=True)

    def start(self) -> AlertTail:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        topic = self.settings.topic_system_health
        consumer = Consumer(
            self.settings.kafka_config(
                **{"group.id": f"bench-alerts-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
            )
        )
        try:
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
            while not self._stop.is_set():
                for msg in consumer.consume(100, timeout=0.2):
                    if msg.error() is not None:
                        continue
                    try:
                        event = ev.decode(msg.value())
                    except ev.EventDecodeError:
                        continue
                    if isinstance(event, ev.HealthAlert | ev.HealthRecovered):
                        p = event.payload
                        self.seen.append(
                            AlertSeen(
                                msg.timestamp()[1] / 1000,
                                event.event_type,
                                p.rule,
                                p.subject,
                                p.value,
                            )
                        )
        finally:
            consumer.close()

    def first(self, event_type: str, after: float) -> AlertSeen | None:
        return next(
            (
                a
                for a in self.seen
                if a.event_type == event_type and a.rule in LAG_RULES and a.at >= after
            ),
            None,
        )


class Phases:
    """The producer side: steady, burst, steady until told to stop."""

    def __init__(self, settings: Settings, rate: float, burst: int, seed: int) -> None:
        self.settings, self.rate, self.burst, self.seed = settings, rate, burst, seed
        self.ledger = Ledger()
        self.burst_start = self.burst_end = 0.0  # wall clock
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="burst-producer", daemon=True)

    def start(self) -> Phases:
        self._thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            publisher = LedgerPublisher(self.settings, self.ledger)
            produce_jobs(
                self.settings, int(self.rate * STEADY_S), publisher, rate=self.rate, seed=self.seed
            )
            self.burst_start = time.time()
            produce_jobs(self.settings, self.burst, publisher, seed=self.seed + 1)
            self.burst_end = time.time()
            # Enough steady events for any drain; stopped as soon as the groups drained.
            produce_jobs(
                self.settings,
                int(self.rate * 3600),
                publisher,
                rate=self.rate,
                seed=self.seed + 2,
                stop=self.stop,
            )
        except BaseException as exc:  # surfaced by join()
            self.error = exc


def run(
    ctx: BenchContext,
    burst: int = 30_000,
    rate: float = 200.0,
    threshold: int = 2_000,
    seed: int = 7,
    timeout: float = 900.0,
) -> BenchResult:
    result = BenchResult("burst", params={"burst": burst, "rate": rate, "threshold": threshold})
    with SmtpSink() as smtp:
        settings = ctx.settings(
            "burst",
            smtp_port=smtp.port,
            health_lag_messages_threshold=threshold,
            health_interval_s=1.0,
        )
        probe = OffsetProbe(settings, group_topics(settings))
        host = HostProcess(settings, ctx.run_dir / "host-burst.log").start()
        tail = AlertTail(settings).start()
        try:
            ctx.progress.say(f"burst: host pid {host.pid}, ready in {host.wait_ready():.1f} s")
            phases = Phases(settings, rate, burst, seed).start()
            t0 = time.monotonic()
            wall0 = time.time()

            def drained(s: Sample) -> bool:
                if not phases.burst_end:
                    return False
                since_burst = time.time() - phases.burst_end
                return since_burst > 2 and all(st.lag <= threshold / 10 for st in s.states.values())

            timeline = watch(
                probe,
                host,
                until=drained,
                timeout=timeout,
                progress=ctx.progress,
                label="burst",
                interval=0.25,
                timeline=Timeline(t0),
            )
            drained_at = timeline.samples[-1].t
            phases.join()
            # Steady traffic is over: let the monitor see the recovery and the groups
            # consume the last events, so the store can be checked against the ledger.
            time.sleep(3 * settings.health_interval_s)
            watch(
                probe,
                host,
                until=all_caught_up(list(SERVICE_GROUPS)),
                timeout=120,
                progress=ctx.progress,
                label="burst (final)",
                timeline=timeline,
            )
            ends = probe.end_offsets()
        finally:
            tail.stop()
            host.stop()

    # Timeline seconds count from t0 (monotonic), taken together with wall0.
    b0, b1 = phases.burst_start - wall0, phases.burst_end - wall0
    result.add(Figure("burst produced in", b1 - b0, "s", note=f"{burst:,} events"))
    drained_at_by_group: dict[str, float] = {}
    for group in SERVICE_GROUPS:
        lags = [(s.t, s.states[group].lag) for s in timeline.samples if s.t >= b0]
        peak_t, peak = max(lags, key=lambda x: x[1]) if lags else (b0, 0)
        result.add(
            Figure(
                f"{group} peak lag",
                peak,
                "messages",
                note=f"{peak_t - b0:.1f} s after the burst began",
            )
        )
        back = next((t for t, lag in lags if t > peak_t and lag <= threshold / 10), drained_at)
        drained_at_by_group[group] = back
        result.add(
            Figure(f"{group} drain time", back - b1, "s", note="burst end → lag ≤ threshold/10")
        )
    refs = references.measure(settings, ends, ctx.jar_dir, ctx.run_dir, ctx.progress)
    for group in SERVICE_GROUPS:
        rate_in = _drain_rate(timeline, group, b0, drained_at_by_group[group])
        bare, perf = refs.ratios(rate_in)
        result.add(
            Figure(f"{group} throughput while draining", rate_in, "events/s", None, bare, perf)
        )
    raised = tail.first(ev.HEALTH_ALERT, phases.burst_start)
    recovered = tail.first(ev.HEALTH_RECOVERED, phases.burst_start)
    result.add(
        Figure(
            "lag alert raised after burst began",
            raised.at - phases.burst_start if raised else None,
            "s",
            note=f"{raised.rule} on {raised.subject}"
            if raised
            else "no lag alert seen on system-health",
        )
    )
    result.add(
        Figure(
            "lag alert recovered after burst ended",
            recovered.at - phases.burst_end if recovered else None,
            "s",
        )
    )
    with Store(settings).reader() as con:
        alerts = con.execute(
            "SELECT rule, subject, value, threshold, raised_at, resolved_at FROM health_alerts "
            "WHERE rule IN ('consumer_lag_messages', 'consumer_lag_seconds') ORDER BY raised_at"
        ).fetchall()
    checked = verify(settings, phases.ledger, ends, list(SERVICE_GROUPS))
    if not checked.ok:
        result.notes.append("; ".join(checked.problems()))
    result.details = {
        "produced": phases.ledger.summary(),
        "alerts_on_topic": [a.__dict__ for a in tail.seen],
        "health_alerts_table": [
            dict(
                zip(
                    ("rule", "subject", "value", "threshold", "raised_at", "resolved_at"),
                    a,
                    strict=True,
                )
            )
            for a in alerts
        ],
        "references": refs.as_dict(),
        "verification": checked.as_dict(),
        "timeline": timeline.compact(0.5),
    }
    return result


def _drain_rate(timeline: Timeline, group: str, start: float, end: float) -> float | None:
    inside = [s for s in timeline.samples if start <= s.t <= end]
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    first, last = inside[0], inside[-1]
    return (last.states[group].done - first.states[group].done) / (last.t - first.t)
