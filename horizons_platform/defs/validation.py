"""Validation jobs: the contract's live scenarios, runnable from the UI against any deployment.

Each job drives real traffic through the running system (orchestrator → Kafka → the
consumer host) under job ids of its own (``val-<run id>-…``), then asserts on what every
consumer wrote to DuckDB. A failed assertion fails the op with a message saying which
consumer fell short and by how much. Nothing here talks to the consumers directly: a
validation run sees the system exactly as users do.
"""

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import dagster as dg
import psutil

from horizons_platform import events as ev
from horizons_platform import waiting
from horizons_platform.defs.resources import DuckDBStore, HorizonsSettings, KafkaPublisher
from horizons_platform.kafka.admin import end_offsets
from horizons_platform.kafka.producer import Delivery
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.client import Store

T = TypeVar("T")
OWNER = "validation@observatory.example"
VALIDATION_TAGS = {"horizons/kind": "validation"}
POLL_S = 0.2  # how often a validation run reads DuckDB while it waits


# --- helpers ---------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until ``condition`` is truthy; fail the op, naming ``what``, at the deadline."""
    try:
        return waiting.wait_until(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise dg.Failure(description=str(exc)) from None


@dataclass
class Probe:
    """Read-only questions about what the consumers wrote, each one short transaction."""

    store: Store
    settings: Settings

    def count(self, sql: str, params: list[Any] | None = None) -> int:
        return int(self.store.scalar(sql, params) or 0)

    def behind(self, ends: dict[tuple[str, int], int]) -> dict[str, int]:
        """Per consumer group, messages it has not yet stored offsets for, up to ``ends``.

        One short read for all groups: the validation run must not itself slow down the
        consumers it measures by holding the DuckDB file.
        """
        _, rows = self.store.query(
            'SELECT consumer_group, topic, "partition", next_offset FROM consumer_offsets'
        )
        stored = {(g, t, p): o for g, t, p, o in rows}
        return {
            group: sum(
                max(0, end - stored.get((group, *tp), 0))
                for tp, end in ends.items()
                if tp[0] in topics
            )
            for group, topics in group_topics(self.settings).items()
        }

    def counts(self, queries: dict[str, tuple[str, list[Any]]]) -> dict[str, int]:
        """Several counts in one short read."""
        with self.store.reader() as con:
            return {
                name: int(con.execute(sql, params).fetchall()[0][0] or 0)
                for name, (sql, params) in queries.items()
            }


def _prefix(context: dg.OpExecutionContext) -> str:
    return f"val-{context.run_id[:8]}-{uuid.uuid4().hex[:4]}"


def _orchestrator(settings: Settings, kafka: KafkaPublisher, wait: bool) -> JobOrchestratorService:
    # Fresh job ids: rebuilding state from the whole topic would only cost time.
    return JobOrchestratorService(settings, kafka.get(), recover=False, wait=wait)


def _percentile_sql(expr: str, table: str, where: str) -> str:
    return f"SELECT quantile_cont({expr}, 0.99), max({expr}), count(*) FROM {table} WHERE {where}"


# --- scenarios 1-4: one job's lifecycle through every consumer ---------------------------


class LifecycleConfig(dg.Config):
    deadline_s: float = 5.0  # scenario 1: every consumer within 5 s
    alert_timeout_s: float = 30.0  # the monitor evaluates every HORIZONS_HEALTH_INTERVAL_S
    require_delivery: bool = True  # also wait for the e-mails to be sent (needs SMTP)
    # Delivery is asynchronous (the outbox): a backlog left by earlier traffic (a
    # 10,000-event validation run is 2,500 e-mails) drains at the SMTP server's pace.
    delivery_timeout_s: float = 60.0


@dg.op(tags=VALIDATION_TAGS)
def validate_lifecycle(
    context: dg.OpExecutionContext,
    config: LifecycleConfig,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> dict[str, float]:
    """Scenarios 1-4: completion, failure and cancellation reach every consumer."""
    s = settings.get()
    probe = Probe(duckdb.get(), s)
    orch = _orchestrator(s, kafka, wait=True)
    prefix = _prefix(context)
    done, failed, cancelled = (f"{prefix}-completed", f"{prefix}-failed", f"{prefix}-cancelled")
    started = time.monotonic()
    orch.submit_job(done, owner=OWNER, job_type="imaging")
    orch.start_job(done, worker="validation")
    last_done = orch.complete_job(done, output_bytes=1024)
    orch.publish_metrics(done, duration_s=12.5, queue_time_s=1.5, cpu_hours=0.1)
    orch.submit_job(failed, owner=OWNER, job_type="correlation")
    orch.start_job(failed, worker="validation")
    last_failed = orch.fail_job(failed, error="validation: injected failure", exit_code=1)
    orch.submit_job(cancelled, owner=OWNER, job_type="calibration")
    last_cancelled = orch.cancel_job(cancelled, reason="validation", cancelled_by=OWNER)

    def consumer_results(
        job: str, status: str, events: int, last: Delivery | None
    ) -> dict[str, bool]:
        assert last is not None  # the orchestrator waits for acknowledgements here
        n = probe.counts(
            {
                "metrics: job_events": ("SELECT count(*) FROM job_events WHERE job_id = ?", [job]),
                "metrics: jobs row": (
                    "SELECT count(*) FROM jobs WHERE job_id = ? AND status = ?",
                    [job, status],
                ),
                "compliance-auditor: audit_log": (
                    "SELECT count(*) FROM audit_log WHERE job_id = ? AND valid",
                    [job],
                ),
                "notifications: outbox": (
                    "SELECT count(*) FROM notifications WHERE job_id = ? AND kind = ?",
                    [job, status],
                ),
                "system-health: consumed": (
                    "SELECT count(*) FROM consumer_offsets WHERE consumer_group = "
                    "'system-health' AND topic = ? AND \"partition\" = ? AND next_offset > ?",
                    [last.topic, last.partition, last.offset],
                ),
            }
        )
        return {
            "metrics: job_events": n["metrics: job_events"] >= events,
            "metrics: jobs row": n["metrics: jobs row"] == 1,
            "compliance-auditor: audit_log": n["compliance-auditor: audit_log"] >= events,
            "notifications: outbox": n["notifications: outbox"] == 1,
            "system-health: consumed": n["system-health: consumed"] == 1,
        }

    def all_reached(job: str, status: str, events: int, last: Delivery | None) -> Callable:
        def check() -> bool:
            return all(consumer_results(job, status, events, last).values())

        return check

    timings: dict[str, float] = {}
    for scenario, job, status, events, last, timeout in (
        ("1-2 completion", done, "completed", 4, last_done, config.deadline_s),
        ("3 failure", failed, "failed", 3, last_failed, config.deadline_s * 2),
        ("4 cancellation", cancelled, "cancelled", 2, last_cancelled, config.deadline_s * 2),
    ):
        try:
            wait_until(all_reached(job, status, events, last), timeout, scenario, POLL_S / 4)
        except dg.Failure:
            missing = [k for k, ok in consumer_results(job, status, events, last).items() if not ok]
            raise dg.Failure(
                description=f"scenario {scenario}: job {job} did not reach every consumer "
                f"within {timeout:g}s; missing: {', '.join(missing)}"
            ) from None
        timings[scenario] = round(time.monotonic() - started, 3)
        context.log.info("scenario %s: all consumers after %.2fs", scenario, timings[scenario])
    if config.require_delivery:
        wait_until(
            lambda: (
                probe.count(
                    "SELECT count(*) FROM notifications "
                    "WHERE job_id IN (?, ?, ?) AND status = 'sent'",
                    [done, failed, cancelled],
                )
                == 3
            ),
            config.delivery_timeout_s,
            "the three e-mails sent by the outbox",
            POLL_S / 4,
        )
        timings["e-mails sent"] = round(time.monotonic() - started, 3)
    if not probe.count(
        "SELECT count(*) FROM job_metrics WHERE job_id = ? AND outcome = 'completed'", [done]
    ):
        raise dg.Failure(description=f"scenario 2: no job_metrics row for {done}")

    # Scenario 3: a failure raises (or finds already open) the job_failures alert.
    wait_until(
        lambda: probe.count(
            "SELECT count(*) FROM health_alerts WHERE rule = 'job_failures' AND resolved_at IS NULL"
        ),
        config.alert_timeout_s,
        "scenario 3: an open job_failures health alert after the failure",
    )
    timings["3 alert"] = round(time.monotonic() - started, 3)
    context.add_output_metadata({k: dg.MetadataValue.float(v) for k, v in timings.items()})
    return timings


@dg.job(tags=VALIDATION_TAGS, description="Scenarios 1-4 against the live system.")
def validation_lifecycle() -> None:
    validate_lifecycle()


# --- scenario 11: throughput --------------------------------------------------------------


class ThroughputConfig(dg.Config):
    events: int = 1000
    deadline_s: float = 30.0


def _publish_plan(
    settings: Settings, kafka: KafkaPublisher, prefix: str, n_jobs: int, rate: float = 0.0
) -> int:
    jobs = plan(n_jobs, seed=11, fail_rate=0.0, cancel_rate=0.0, prefix=prefix)
    orch = _orchestrator(settings, kafka, wait=False)
    return run_simulation(orch, jobs, rate=rate)


def _wait_all_groups(
    probe: Probe, ends: dict[tuple[str, int], int], timeout: float, started: float
) -> dict[str, float]:
    """Wait until every consumer group stored offsets up to ``ends``; seconds per group."""
    caught: dict[str, float] = {}
    groups = list(group_topics(probe.settings))

    def all_caught_up() -> bool:
        for group, behind in probe.behind(ends).items():
            if group not in caught and behind == 0:
                caught[group] = round(time.monotonic() - started, 3)
        return len(caught) == len(groups)

    try:
        wait_until(all_caught_up, timeout, "every consumer group", POLL_S)
    except dg.Failure:
        behind = {g: n for g, n in probe.behind(ends).items() if g not in caught}
        raise dg.Failure(
            description=f"after {timeout:g}s these consumer groups are still behind "
            f"(messages): {behind}; caught up: {caught}"
        ) from None
    return caught


@dg.op(tags=VALIDATION_TAGS)
def validate_throughput(
    context: dg.OpExecutionContext,
    config: ThroughputConfig,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> dict[str, float]:
    """Scenario 11: N events (default 1,000) processed by every consumer within the deadline."""
    s = settings.get()
    probe = Probe(duckdb.get(), s)
    prefix = _prefix(context)
    started = time.monotonic()
    sent = _publish_plan(s, kafka, prefix, max(1, config.events // 4))
    published = time.monotonic() - started
    ends = end_offsets(s, [s.topic_job_lifecycle, s.topic_job_metrics])
    caught = _wait_all_groups(probe, ends, config.deadline_s - published, started)
    stored = probe.count("SELECT count(*) FROM job_events WHERE job_id LIKE ?", [f"{prefix}-%"])
    audited = probe.count("SELECT count(*) FROM audit_log WHERE job_id LIKE ?", [f"{prefix}-%"])
    if stored != sent or audited != sent:
        raise dg.Failure(
            description=f"published {sent} events but metrics stored {stored} and the "
            f"auditor {audited}"
        )
    elapsed = max(caught.values())
    result = {
        "events": float(sent),
        "elapsed_s": elapsed,
        "events_per_s": round(sent / elapsed, 1),
        "publish_s": round(published, 3),
    }
    context.log.info("%d events through every consumer in %.2fs", sent, elapsed)
    context.add_output_metadata({**result, **{f"caught_up_s/{g}": v for g, v in caught.items()}})
    return result


@dg.job(tags=VALIDATION_TAGS, description="Scenario 11: 1,000 events processed in < 30 s.")
def validation_throughput() -> None:
    validate_throughput()


# --- scenario 12: latency ----------------------------------------------------------------


class LatencyConfig(dg.Config):
    jobs: int = 100
    rate: float = 100.0  # events/s: a steady load, so this measures latency, not backlog
    p99_limit_s: float = 1.0
    notification_limit_s: float = 2.0
    timeout_s: float = 60.0


@dg.op(tags=VALIDATION_TAGS)
def validate_latency(
    context: dg.OpExecutionContext,
    config: LatencyConfig,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> dict[str, float]:
    """Scenario 12: p99 end-to-end latency < 1 s; notification < 2 s after completion."""
    s = settings.get()
    probe = Probe(duckdb.get(), s)
    prefix = _prefix(context)
    started = time.monotonic()
    sent = _publish_plan(s, kafka, prefix, config.jobs, rate=config.rate)
    ends = end_offsets(s, [s.topic_job_lifecycle, s.topic_job_metrics])
    _wait_all_groups(probe, ends, config.timeout_s, started)
    like = [f"{prefix}-%"]
    wait_until(
        lambda: (
            probe.count(
                "SELECT count(*) FROM notifications WHERE job_id LIKE ? AND status = 'sent'", like
            )
            >= config.jobs
        ),
        config.timeout_s,
        f"{config.jobs} notifications sent (is the SMTP server at {s.smtp_host}:{s.smtp_port} up?)",
        POLL_S,
    )
    lat = "epoch(ingested_at) - epoch(occurred_at)"
    audit_lat = "epoch(recorded_at) - epoch(occurred_at)"
    note_lat = "epoch(n.sent_at) - epoch(e.occurred_at)"
    with probe.store.reader() as con:
        p99, worst, n = con.execute(
            _percentile_sql(lat, "job_events", "job_id LIKE ?"), like
        ).fetchone()
        a99, aworst, an = con.execute(
            _percentile_sql(audit_lat, "audit_log", "job_id LIKE ?"), like
        ).fetchone()
        n99, nworst, nn = con.execute(
            _percentile_sql(
                note_lat,
                "notifications n JOIN job_events e ON e.event_id = n.event_id",
                "n.job_id LIKE ?",
            ),
            like,
        ).fetchone()
    result = {
        "events": float(sent),
        "p99_metrics_s": round(p99, 4),
        "max_metrics_s": round(worst, 4),
        "p99_audit_s": round(a99, 4),
        "max_audit_s": round(aworst, 4),
        "p99_notification_s": round(n99, 4),
        "max_notification_s": round(nworst, 4),
    }
    context.add_output_metadata(result)
    context.log.info("latencies: %s", result)
    problems = []
    if n != sent or an != sent or nn != config.jobs:
        problems.append(f"stored {n}/{sent} job events, {an}/{sent} audit, {nn} notifications")
    if max(p99, a99) >= config.p99_limit_s:
        problems.append(
            f"p99 end-to-end latency {max(p99, a99):.3f}s ≥ {config.p99_limit_s:g}s "
            f"(metrics {p99:.3f}s, audit {a99:.3f}s)"
        )
    if n99 >= config.notification_limit_s:
        problems.append(
            f"p99 notification {n99:.3f}s after completion ≥ {config.notification_limit_s:g}s"
        )
    if problems:
        raise dg.Failure(description="; ".join(problems), metadata=result)
    return result


@dg.job(tags=VALIDATION_TAGS, description="Scenario 12: p99 latency < 1 s, e-mail < 2 s.")
def validation_latency() -> None:
    validate_latency()


# --- scenario 13: bounded memory ---------------------------------------------------------


class MemoryConfig(dg.Config):
    events: int = 10_000
    max_growth_mb: float = 256.0
    timeout_s: float = 180.0


def _consumer_host_process(probe: Probe) -> psutil.Process | None:
    """The consumer host's process, from its consumer.started announcement, if on this machine."""
    _, rows = probe.store.query(
        "SELECT json_extract_string(payload, '$.host'), "
        "CAST(json_extract(payload, '$.pid') AS BIGINT) FROM audit_log "
        "WHERE event_type = 'consumer.started' ORDER BY seq DESC LIMIT 8"
    )
    for host, pid in rows:
        if host == socket.gethostname() and pid and psutil.pid_exists(pid):
            return psutil.Process(pid)
    return None


@dg.op(tags=VALIDATION_TAGS)
def validate_memory_bounded(
    context: dg.OpExecutionContext,
    config: MemoryConfig,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> dict[str, float]:
    """Scenario 13: 10,000 events through every consumer; the host's memory stays bounded."""
    s = settings.get()
    probe = Probe(duckdb.get(), s)
    proc = _consumer_host_process(probe)
    if proc is None:
        context.log.warning("consumer host not on this machine: memory is not measured")
    baseline = proc.memory_info().rss if proc else 0
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while proc is not None and not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    prefix = _prefix(context)
    started = time.monotonic()
    try:
        sent = _publish_plan(s, kafka, prefix, max(1, config.events // 4))
        ends = end_offsets(s, [s.topic_job_lifecycle, s.topic_job_metrics])
        caught = _wait_all_groups(probe, ends, config.timeout_s, started)
    finally:
        stop.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    result = {
        "events": float(sent),
        "elapsed_s": max(caught.values()),
        "baseline_rss_mb": round(baseline / 2**20, 1),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "growth_mb": round(growth_mb, 1),
        "measured_pid": float(proc.pid if proc else 0),
        "measured_self": float(proc is not None and proc.pid == os.getpid()),
    }
    context.add_output_metadata(result)
    if proc is not None and growth_mb > config.max_growth_mb:
        raise dg.Failure(
            description=f"consumer host (pid {proc.pid}) grew by {growth_mb:.0f} MiB while "
            f"processing {sent} events (limit {config.max_growth_mb:g} MiB)",
            metadata=result,
        )
    return result


@dg.job(tags=VALIDATION_TAGS, description="Scenario 13: 10,000 events with bounded memory.")
def validation_memory_bounded() -> None:
    validate_memory_bounded()


# --- scenario 14: four topics, four independent groups ------------------------------------


class ParallelConfig(dg.Config):
    events: int = 500
    deadline_s: float = 30.0


@dg.op(tags=VALIDATION_TAGS)
def validate_parallel_groups(
    context: dg.OpExecutionContext,
    config: ParallelConfig,
    settings: HorizonsSettings,
    duckdb: DuckDBStore,
    kafka: KafkaPublisher,
) -> dict[str, float]:
    """Scenario 14: events on all four topics, each group reads its own at its own pace."""
    s = settings.get()
    probe = Probe(duckdb.get(), s)
    prefix = _prefix(context)
    publisher = kafka.get()
    # A fifth of the events are jobs (submit, start, complete, metrics: four topics'
    # worth on two topics); the rest are probes on audit-trail and system-health.
    n_jobs = max(1, config.events // 10)
    probes = config.events - 4 * n_jobs
    started = time.monotonic()
    sent = _publish_plan(s, kafka, prefix, n_jobs)
    for i in range(probes):
        # Audit records, not alerts or heartbeats: they exercise both topics' consumers
        # without touching the health state operators watch.
        topic = s.topic_audit_trail if i % 2 == 0 else s.topic_system_health
        record = ev.new_event(
            ev.AuditRecord,
            producer="dagster:validation_parallel_groups",
            job_id=f"{prefix}-probe-{i:04d}",
            payload={"action": "validation.probe", "actor": context.run_id, "details": {"i": i}},
        )
        publisher.send_async(
            topic, ev.encode(record), key=record.job_id, headers=ev.headers_for(record)
        )
        sent += 1
    if publisher.flush(30.0):
        raise dg.Failure(description="Kafka did not acknowledge every probe within 30 s")
    topics = [
        s.topic_job_lifecycle,
        s.topic_job_metrics,
        s.topic_audit_trail,
        s.topic_system_health,
    ]
    ends = end_offsets(s, topics)
    caught = _wait_all_groups(probe, ends, config.deadline_s, started)
    audited = probe.count("SELECT count(*) FROM audit_log WHERE job_id LIKE ?", [f"{prefix}-%"])
    if audited != sent:
        raise dg.Failure(description=f"published {sent} events on 4 topics, audited {audited}")
    context.log.info("%d events on four topics; groups caught up after %s", sent, caught)
    result = {"events": float(sent), **{f"caught_up_s/{g}": v for g, v in caught.items()}}
    context.add_output_metadata(result)
    return result


@dg.job(tags=VALIDATION_TAGS, description="Scenario 14: 500 events, 4 topics, 4 groups.")
def validation_parallel_groups() -> None:
    validate_parallel_groups()


JOBS = [
    validation_lifecycle,
    validation_throughput,
    validation_latency,
    validation_memory_bounded,
    validation_parallel_groups,
]
