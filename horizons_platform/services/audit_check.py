"""Verify the audit trail as a user runs it (`verify-audit`, the chain check, the report):
the trusted public key from its file, the newest head published on ``audit-trail``
(Kafka, the witness outside the database), services/audit_verify.py over one snapshot,
and the end of a successful run remembered for the next, incremental one."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from horizons_platform.kafka.admin import one_shot_config, watermarks
from horizons_platform.services.audit_verify import TrailReport, record_verification, verify_trail
from horizons_platform.services.keys import load_public
from horizons_platform.services.signing import HEAD_ACTION, HEAD_KEY, SignedHead
from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)

TAIL = 1_000  # messages read from the end of each partition


def newest_published_head(settings: Settings, timeout: float = 10.0) -> SignedHead | None:
    """The head with the highest seq among the last messages of ``audit-trail``; None when
    none was published (yet). Raises KafkaException when the broker cannot be read."""
    topic = settings.topic_audit_trail
    # A broker that is down is this function's answer (KafkaException): one_shot_config.
    consumer = Consumer(
        one_shot_config(
            settings,
            **{"group.id": f"horizons-witness-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False},
        )
    )
    try:
        deadline = time.monotonic() + timeout
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        ends: dict[int, int] = {}
        assign = []
        for p in meta.partitions:
            low, high = watermarks(consumer, TopicPartition(topic, p), deadline)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, max(low, high - TAIL)))
        consumer.assign(assign)
        best: SignedHead | None = None
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                partition, offset = msg.partition(), msg.offset()
                if msg.error() or partition is None or offset is None:
                    continue
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
                if msg.key() != HEAD_KEY:
                    continue
                try:
                    payload = json.loads(msg.value() or b"null")["payload"]
                    if payload["action"] != HEAD_ACTION:
                        continue
                    head = SignedHead.from_json(payload["details"])
                except (ValueError, KeyError, TypeError):
                    continue
                if best is None or head.seq > best.seq:
                    best = head
        if ends:
            raise KafkaException(f"could not read {topic} to its end within {timeout:.0f}s")
        return best
    finally:
        consumer.close()


def check_trail(
    store: StoreBase,
    settings: Settings,
    *,
    full: bool = False,
    witness: bool = True,
    on_rows: Callable[[int, int | None], None] | None = None,
) -> TrailReport:
    """Verify (incrementally unless ``full``) against the signed heads and Kafka's."""
    public = load_public(settings)
    # A store that cannot be read fails now, not after a wait for Kafka. (Kafka is asked
    # before the snapshot is taken, never after: a head published in between would look
    # like one the store lost.)
    store.scalar("SELECT 1")
    published: SignedHead | None = None
    unreachable = ""
    if witness:
        try:
            published = newest_published_head(settings, timeout=5.0)
        except KafkaException as exc:
            unreachable = f"Kafka not asked (unreachable: {exc}); heads checked in the store only"
    with store.snapshot() as con:
        report = verify_trail(con, public, full=full, witness=published, on_rows=on_rows)
    if unreachable:
        report.notes.append(unreachable)
    if report.ok:
        store.write(lambda con: record_verification(con, report, full))
    return report
