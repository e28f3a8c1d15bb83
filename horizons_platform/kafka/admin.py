"""Topics, partition counts and consumer lag, through librdkafka's admin API."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic, OffsetSpec

from horizons_platform.settings import Settings


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_config())


def one_shot_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a short-lived client (a command, the audit witness) whose
    failure to reach the cluster is its caller's answer, reported in one line. It logs
    critical lines only: at librdkafka's default level every refused connection of a
    broker that is down was a log line too, hundreds in a run."""
    return settings.kafka_config(log_level=2, **extra)


def answers_a_new_client(settings: Settings, topic: str, timeout: float) -> bool:
    """Whether the cluster answers one metadata request from a brand-new client. The
    client is silent (no Python logger, librdkafka's own logging off): it is dropped
    wherever the garbage collector finds it, and confluent-kafka 2.16 aborts the process
    when a handle being destroyed there hands a log line to Python ("CallState_get:
    Assertion `cs != NULL' failed", seen in the consumer loop)."""
    conf = settings.kafka_config(log_level=0)
    conf.pop("logger", None)
    try:
        AdminClient(conf).list_topics(topic, timeout=timeout)
    except KafkaException:
        return False
    return True


def ensure_topics(settings: Settings, timeout: float = 30.0) -> dict[str, int]:
    """Create the contract's topics that are missing; existing ones are left alone."""
    admin = admin_client(settings)
    wanted = settings.topic_partitions()
    existing = admin.list_topics(timeout=timeout).topics
    config = {}
    if settings.topic_min_insync is not None:
        config["min.insync.replicas"] = str(settings.topic_min_insync)
    new = [
        NewTopic(
            name,
            num_partitions=parts,
            replication_factor=settings.topic_replication,
            config=config,
        )
        for name, parts in wanted.items()
        if name not in existing
    ]
    if new:
        for name, future in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                future.result(timeout=timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"could not create topic {name}: {exc}") from exc
    # Metadata propagates asynchronously: wait until every partition has a leader, or
    # the first produce/fetch right after creation fails with NOT_LEADER.
    deadline = time.monotonic() + timeout
    while True:
        meta = admin.list_topics(timeout=timeout).topics
        ready = all(
            name in meta
            and meta[name].error is None
            and all(p.leader >= 0 for p in meta[name].partitions.values())
            for name in wanted
        )
        if ready or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if new:
        # As many partitions as the topic has: one created by someone else meanwhile
        # (TOPIC_ALREADY_EXISTS above, e.g. auto-created by a producer) may have fewer.
        served = {t.topic: len(meta[t.topic].partitions) for t in new if t.topic in meta}
        _wait_until_served(settings, served, deadline)
    return {name: len(meta[name].partitions) if name in meta else 0 for name in wanted}


_RETRIABLE = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError._UNKNOWN_PARTITION,
)


def watermarks(consumer: Consumer, tp: TopicPartition, deadline: float) -> tuple[int, int]:
    """(low, high) offsets, retrying while a just-created partition is not served yet."""
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=max(1.0, deadline - time.monotonic()))
        except KafkaException as exc:
            if exc.args[0].code() not in _RETRIABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_until_served(settings: Settings, topics: dict[str, int], deadline: float) -> None:
    # A leader in the metadata is not enough: the broker applies the new partitions
    # asynchronously and answers NOT_LEADER until it has.
    probe = Consumer(settings.kafka_config(**{"group.id": "horizons-topic-probe"}))
    try:
        for topic, parts in topics.items():
            for p in range(parts):
                watermarks(probe, TopicPartition(topic, p), deadline)
    finally:
        probe.close()


def topic_partitions(settings: Settings, admin: AdminClient | None = None) -> dict[str, int]:
    admin = admin or admin_client(settings)
    meta = admin.list_topics(timeout=10)
    return {
        name: len(t.partitions)
        for name, t in meta.topics.items()
        if not name.startswith("__") and t.error is None
    }


def end_offsets(
    settings: Settings,
    topics: list[str],
    timeout: float = 10.0,
    admin: AdminClient | None = None,
) -> dict[tuple[str, int], int]:
    """Kafka's end offset (the next offset to be written) of every partition of ``topics``
    that exists; ``admin`` reuses a client across calls."""
    admin = admin or admin_client(settings)
    meta = admin.list_topics(timeout=timeout).topics
    request = {
        TopicPartition(t, p): OffsetSpec.latest()
        for t in topics
        if t in meta
        for p in meta[t].partitions
    }
    if not request:
        return {}
    futures = admin.list_offsets(request, request_timeout=timeout)
    return {(tp.topic, tp.partition): f.result(timeout).offset for tp, f in futures.items()}


def list_watermarks(
    admin: AdminClient, partitions: list[tuple[str, int]], timeout: float = 10.0
) -> dict[tuple[str, int], tuple[int, int]]:
    """(low, high) of every partition, in one batched ListOffsets request per side
    (:func:`watermarks` asks a consumer, one partition at a time)."""
    found: dict[tuple[str, int], list[int]] = {tp: [0, 0] for tp in partitions}
    for side, spec in ((0, OffsetSpec.earliest()), (1, OffsetSpec.latest())):
        request = {TopicPartition(t, p): spec for t, p in partitions}
        futures = admin.list_offsets(request, request_timeout=timeout)
        for tp, future in futures.items():
            found[(tp.topic, tp.partition)][side] = future.result(timeout).offset
    return {tp: (low, high) for tp, (low, high) in found.items()}


def short_of_replicas(metadata: ClusterMetadata, topics: list[str] | None = None) -> list[str]:
    """``topic[partition]`` (of ``topics``, default all) with fewer in-sync replicas than
    replicas, or no leader: a node is down or behind, and one more loss may stop writes."""
    names = metadata.topics if topics is None else [t for t in topics if t in metadata.topics]
    return [
        f"{name}[{p.id}]"
        for name in names
        for p in metadata.topics[name].partitions.values()
        if p.leader < 0 or len(p.isrs) < len(p.replicas)
    ]


def under_replicated(settings: Settings, topics: list[str], timeout: float = 5.0) -> list[str]:
    """The partitions of ``topics`` short of replicas (:func:`short_of_replicas`)."""
    return short_of_replicas(admin_client(settings).list_topics(timeout=timeout), topics)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # next offset the group will read
    high: int  # offset of the next message to be written
    lag: int  # messages not yet consumed
    age_s: float  # age of the oldest unconsumed message (0 when none)


def group_lag(
    settings: Settings,
    groups: dict[str, list[str]],
    timeout: float = 10.0,
    with_ages: bool = True,
) -> list[PartitionLag]:
    """Lag per group and partition, in messages and seconds, from Kafka's committed offsets
    (``with_ages=False``: messages only, without fetching a record per lagging partition;
    ``age_s`` is then 0)."""
    # A short fetch wait: the age probe's poll would otherwise leave a fetch outstanding
    # that every later watermark request on this consumer queues behind (~0.5 s each).
    probe = Consumer(
        settings.kafka_config(
            **{
                "group.id": "horizons-lag-probe",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                # It reads one record per lagging partition: without these, librdkafka
                # prefetches megabytes behind each one, and a host catching up spent a
                # tenth of its CPU in this probe.
                "queued.min.messages": 1,
                "fetch.max.bytes": 1_048_576,
                "max.partition.fetch.bytes": 65_536,
            }
        )
    )
    try:
        meta = probe.list_topics(timeout=timeout)
        deadline = time.monotonic() + timeout
        marks: dict[tuple[str, int], tuple[int, int]] = {}  # shared by groups on a topic
        rows: list[tuple[str, str, int, int, int]] = []
        for group, topics in groups.items():
            tps = [
                TopicPartition(t, p)
                for t in topics
                if t in meta.topics
                for p in meta.topics[t].partitions
            ]
            for tp in _committed(settings, group, tps, timeout):
                key = (tp.topic, tp.partition)
                if key not in marks:
                    marks[key] = watermarks(probe, TopicPartition(*key), deadline)
                low, high = marks[key]
                start = tp.offset if tp.offset != OFFSET_INVALID and tp.offset >= 0 else low
                rows.append((group, tp.topic, tp.partition, start, high))
        # Ages last, all lagging partitions in one fetch round.
        lagging = {(t, p, s) for _, t, p, s, h in rows if h > s}
        ages = _ages(probe, lagging, timeout) if with_ages else {}
        return [
            PartitionLag(g, t, p, s, h, max(0, h - s), ages.get((t, p, s), 0.0))
            for g, t, p, s, h in rows
        ]
    finally:
        probe.close()


def _ages(
    probe: Consumer, wanted: set[tuple[str, int, int]], timeout: float
) -> dict[tuple[str, int, int], float]:
    """Seconds since the record at each (topic, partition, offset) was produced.

    One fetch round per distinct offset of a partition (groups sharing a topic usually
    wait at one or two offsets), each round covering every lagging partition at once.
    """
    by_tp: dict[tuple[str, int], list[int]] = {}
    for t, p, o in sorted(wanted):
        by_tp.setdefault((t, p), []).append(o)
    ages: dict[tuple[str, int, int], float] = {}
    deadline = time.monotonic() + min(timeout, 3.0)
    depth = 0
    while time.monotonic() < deadline:
        pending = {tp: offs[depth] for tp, offs in by_tp.items() if len(offs) > depth}
        if not pending:
            break
        probe.assign([TopicPartition(t, p, o) for (t, p), o in pending.items()])
        try:
            while pending and time.monotonic() < deadline:
                for msg in probe.consume(len(pending) * 10, timeout=0.2):
                    key = (msg.topic(), msg.partition())
                    if msg.error() or key not in pending:
                        continue
                    _, ts_ms = msg.timestamp()
                    age = time.time() - ts_ms / 1000.0 if ts_ms > 0 else 0.0
                    ages[(*key, pending.pop(key))] = max(0.0, age)
        finally:
            probe.unassign()
        depth += 1
    return ages


def _committed(
    settings: Settings, group: str, tps: list[TopicPartition], timeout: float
) -> list[TopicPartition]:
    """The group's committed offsets, read by a consumer that never joins the group.

    Not AdminClient.list_consumer_group_offsets: right after a broker restart it can
    crash librdkafka 2.16 (SIGSEGV on NOT_COORDINATOR, librdkafka#5040).
    """
    reader = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        return reader.committed(tps, timeout=timeout) if tps else []
    finally:
        reader.close()
