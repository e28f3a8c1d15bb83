"""Helpers only the tests need: topics of their own, reading a topic, the `horizons`
command line and consumer hosts as subprocesses, an audit trail recorded in the past.
What the benchmarks need too lives beside them in horizons_bench (the SMTP sink, host
subprocesses and their environment, free port blocks) or in the platform (free_port,
wait_until, end_offsets). No mocks here — everything talks to real servers on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from horizons_bench.harness import subprocess_env
from horizons_bench.hostproc import HostProcess, stop_process
from horizons_platform.kafka.admin import watermarks
from horizons_platform.settings import Settings


def unique_topics(prefix: str | None = None) -> dict[str, str]:
    """Settings overrides giving a test its own topics (isolation on a shared broker)."""
    tag = prefix or uuid.uuid4().hex[:8]
    return {
        "topic_job_lifecycle": f"job-lifecycle-{tag}",
        "topic_job_metrics": f"job-metrics-{tag}",
        "topic_audit_trail": f"audit-trail-{tag}",
        "topic_system_health": f"system-health-{tag}",
        "topic_dlq": f"horizons-dlq-{tag}",
    }


def read_topic(settings: Settings, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every message currently in ``topic`` (all partitions, from the beginning)."""
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": f"test-reader-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False}
        )
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        assign = []
        for p in meta.partitions:
            low, high = watermarks(consumer, TopicPartition(topic, p), time.monotonic() + timeout)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
        consumer.assign(assign)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error():
                    continue
                out.append(msg)
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
        return out
    finally:
        consumer.close()


@contextmanager
def running(target: Callable[[], Any]) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield thread


def horizons(
    settings: Settings, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the `horizons` command line as a user would, with ``settings`` as HORIZONS_*."""
    return subprocess.run(
        [sys.executable, "-m", "horizons_platform.cli", *args],
        env=subprocess_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_consumer(
    settings: Settings, log: Path, *, services: Sequence[str] = (), **extra: object
) -> subprocess.Popen[bytes]:
    """`horizons consume` (``services``, default all four) as a real process, started as
    the benchmarks start theirs, output appended to ``log``; ``extra`` are settings."""
    env = {f"HORIZONS_{k.upper()}": str(v) for k, v in extra.items()}
    host = HostProcess(settings, log, tuple(services) or None, env).start()
    assert host.proc is not None
    return host.proc


def stop_consumer(proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> int:
    """SIGTERM a host started by ``start_consumer`` and wait for it; its exit code.

    A host that is still there after ``timeout`` (more than its own stop budget plus the
    ``exit_within`` backstop) fails the test with what it was doing — its stacks, asked
    for with SIGUSR1, and the end of its log — instead of a bare TimeoutExpired."""
    code = stop_process(proc, log, timeout)
    if code is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-150:])
        raise AssertionError(
            f"consumer host {proc.pid} still running {timeout:.0f} s after SIGTERM; "
            f"its log ends:\n{tail}"
        )
    return code


def record_in_the_past(
    store: Any, events: list[tuple[bytes, datetime]], topic: str = "archive"
) -> None:
    """Audit rows exactly as the auditor writes them (chained by the project's own code),
    but recorded at the given times: a store that has been running for months. The
    auditor cannot be asked to record in the past, so tests of retention by recorded_at
    start here. Call it before a host writes to the store (a running auditor keeps the
    chain's tail in memory)."""
    from horizons_platform.kafka.records import Batch
    from horizons_platform.services.audit import AuditHandler, audit_columns

    handler = AuditHandler(store.settings)
    store.ensure_schema()
    with store.transaction() as con:
        first = con.execute(
            'SELECT coalesce(max("offset"), -1) + 1 FROM audit_log WHERE topic = ?', [topic]
        ).fetchall()[0][0]
        for i, (value, at) in enumerate(events):
            batch = Batch.decode([topic], [0], [first + i], [None], [value], [0])
            handler.persist(con, {"audit_log": audit_columns(batch, at)})
            handler.after_commit({})


def run_jobs(
    settings: Settings, prefix: str, n: int, owner: str = "ada@observatory.example"
) -> int:
    """n jobs submitted, started and completed through the orchestrator; the event count."""
    from horizons_platform.services.orchestrator import JobOrchestratorService

    orch = JobOrchestratorService(settings, recover=False, wait=False)
    for i in range(n):
        orch.submit_job(f"{prefix}-{i}", owner=owner, job_type="imaging")
        orch.start_job(f"{prefix}-{i}")
        orch.complete_job(f"{prefix}-{i}")
    orch.flush()
    return 3 * n
