"""JobOrchestratorService and topics against the real broker (issue: foundation)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from horizons_bench.harness import free_port_block
from horizons_platform.kafka.admin import end_offsets, ensure_topics, topic_partitions
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.kafka.producer import DeliveryError, Publisher
from horizons_platform.services.orchestrator import IllegalTransition, JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform_tests.support import read_topic, unique_topics

OWNER = "ada@observatory.example"


def test_topics_exist_with_contract_partition_counts(settings: Settings) -> None:
    parts = topic_partitions(settings)
    assert parts[settings.topic_job_lifecycle] == 6
    assert parts[settings.topic_job_metrics] == 6
    assert parts[settings.topic_audit_trail] == 3
    assert parts[settings.topic_system_health] == 3
    assert parts[settings.topic_dlq] == 3
    # Idempotent: a second call changes nothing and does not fail.
    assert ensure_topics(settings) == {
        t: n for t, n in parts.items() if t in settings.topic_partitions()
    }


def test_interleaved_jobs_each_land_in_one_partition_in_order(settings: Settings) -> None:
    orch = JobOrchestratorService(settings)
    jobs = ["obs-a", "obs-b", "obs-c"]
    deliveries: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for step in range(4):
        for job in jobs:
            if step == 0:
                d = orch.submit_job(job, owner=OWNER, job_type="imaging")
            elif step == 1:
                d = orch.start_job(job)
            elif step == 2:
                d = orch.complete_job(job)
            else:
                d = orch.publish_metrics(job, duration_s=1.0, queue_time_s=0.5)
            assert d is not None
            if step < 3:
                deliveries[job].append((d.partition, d.offset))
    for job in jobs:
        assert len({p for p, _ in deliveries[job]}) == 1
        offsets = [o for _, o in deliveries[job]]
        assert offsets == sorted(offsets)
    seen = defaultdict(list)
    for msg in read_topic(settings, settings.topic_job_lifecycle):
        seen[msg.key().decode()].append(
            (msg.partition(), msg.offset(), dict(msg.headers())["event_type"].decode())
        )
    for job in jobs:
        assert [t for _, _, t in sorted(seen[job])] == [
            "job.submitted",
            "job.started",
            "job.completed",
        ]


def test_illegal_transition_raises_and_publishes_nothing(settings: Settings) -> None:
    orch = JobOrchestratorService(settings)
    orch.submit_job("obs-x", owner=OWNER, job_type="calibration")
    orch.cancel_job("obs-x", reason="operator")
    before = end_offsets(settings, [settings.topic_job_lifecycle])
    with pytest.raises(IllegalTransition, match="cancelled: cannot mark it completed"):
        orch.complete_job("obs-x")
    with pytest.raises(IllegalTransition, match="unknown"):
        orch.start_job("never-submitted")
    with pytest.raises(IllegalTransition):
        orch.submit_job("obs-x", owner=OWNER, job_type="calibration")
    assert end_offsets(settings, [settings.topic_job_lifecycle]) == before


def test_state_survives_a_restart(settings: Settings) -> None:
    first = JobOrchestratorService(settings)
    first.submit_job("obs-r", owner=OWNER, job_type="imaging")
    first.start_job("obs-r")
    second = JobOrchestratorService(settings)  # a new process would rebuild the same way
    assert second.state("obs-r") == "running"
    with pytest.raises(IllegalTransition):
        second.start_job("obs-r")
    delivery = second.complete_job("obs-r")
    assert delivery is not None and delivery.offset >= 2


def test_finished_jobs_are_forgotten_oldest_first(settings: Settings) -> None:
    orch = JobOrchestratorService(settings, recover=False, wait=False)
    orch.finished_jobs_kept = 5
    for i in range(30):
        orch.submit_job(f"bounded-{i}", owner=OWNER, job_type="imaging")
        orch.start_job(f"bounded-{i}")
        orch.complete_job(f"bounded-{i}")
    orch.submit_job("bounded-live", owner=OWNER, job_type="imaging")
    orch.flush()
    assert orch.jobs_in_memory == 6  # 5 finished + 1 live
    assert orch.state("bounded-29") == "completed" and orch.state("bounded-0") is None
    orch.publish_metrics("bounded-29", duration_s=1.0, queue_time_s=0.1)  # newest: kept
    recovered = JobOrchestratorService(settings, recover=False)
    recovered.finished_jobs_kept = 5
    recovered.recover()
    assert recovered.state("bounded-live") == "submitted"
    # Other tests on this broker leave unfinished jobs (recovery keeps all of those);
    # of the finished ones only five stay (partitions are read side by side, so which
    # five is not "the newest" across partitions).
    assert len(recovered._finished) == 5


def test_delivery_failure_when_broker_is_down_is_an_error_not_a_hang(tmp_path: Path) -> None:
    port = free_port_block(2)
    s = Settings(
        var_dir=tmp_path,
        broker_port=port,
        broker_controller_port=port + 1,
        **unique_topics(),
    )  # type: ignore[arg-type]
    broker = EmbeddedBroker(s)
    broker.start(progress=lambda _: None)
    try:
        ensure_topics(s)
        orch = JobOrchestratorService(s, Publisher(s, delivery_timeout_s=3.0))
        orch.submit_job("obs-d", owner=OWNER, job_type="imaging")
        broker.stop()
        started = time.monotonic()
        with pytest.raises(DeliveryError):
            orch.start_job("obs-d")
        assert time.monotonic() - started < 15
        # Nothing was acknowledged, so the state machine did not move.
        assert orch.state("obs-d") == "submitted"
    finally:
        broker.stop()


def test_a_fatal_producer_error_is_followed_by_a_new_producer(settings: Settings) -> None:
    # librdkafka reports e.g. OUT_OF_ORDER_SEQUENCE_NUMBER as fatal against a cluster
    # replaced behind the address; it cannot be provoked on demand, so the error callback
    # is handed one. The next send must go through a new producer and be delivered.
    publisher = Publisher(settings)
    publisher._on_error(KafkaError(KafkaError._FATAL, "injected", fatal=True))
    delivery = publisher.send(settings.topic_audit_trail, b"{}", key="fatal")
    assert delivery.offset >= 0
    assert publisher._fatal is None
