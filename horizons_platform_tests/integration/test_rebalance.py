"""A consumer group rebalanced under a live stream (against a real broker and DuckDB),
and what its assignment tells Kafka.

Every rebalance calls the loop's revoke/assign callbacks inside ``consume()``, and they
wait for the batch being written. Before the loop kept every Kafka call on its own
thread, the writer thread's commit waited for ``consume()`` to return (confluent-kafka
2.16 lets one thread at a time into a consumer) while the callback waited for the
writer: the group stopped for good, without an error — what a Kafka node loss provoked
in the node-loss drill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer

from horizons_platform.host import Host
from horizons_platform.kafka.admin import group_lag
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import run_jobs

AUDITOR = "compliance-auditor"
FENCE_JOBS = "job_id LIKE 'fence-%'"


def _join_and_leave(settings: Settings, topics: list[str], **config: object) -> None:
    """Another member joins the group (the host gives up partitions), holds them until
    the rebalance is done, then leaves (the host takes them back)."""
    member = Consumer(
        settings.kafka_config(
            **{
                "group.id": AUDITOR,
                "enable.auto.commit": False,
                "session.timeout.ms": 10_000,
                **config,
            }
        )
    )
    assigned = threading.Event()
    member.subscribe(topics, on_assign=lambda _c, parts: parts and assigned.set())
    deadline = time.monotonic() + 60
    while not assigned.is_set() and time.monotonic() < deadline:
        member.poll(0.2)
    member.close()
    assert assigned.is_set(), "the second member got no partitions within 60 s"


def test_a_rebalance_under_a_live_stream_stalls_no_group(
    settings: Settings, host_factory: Callable[..., Host]
) -> None:
    topics = group_topics(settings)[AUDITOR]
    store = Store(settings)
    host_factory(settings, (AUDITOR,))
    produced: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        round_ = 0
        while not stop.is_set():
            produced.append(run_jobs(settings, f"rebalance{round_}", 25))
            round_ += 1

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        for _ in range(3):
            wait_until(lambda: store.scalar("SELECT count(*) FROM audit_log") > 0, 60, what="rows")
            _join_and_leave(settings, topics)
    finally:
        stop.set()
        streamer.join(60)

    total = sum(produced)
    wait_until(
        lambda: (
            store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 'rebalance%'") == total
        ),
        60,
        what=f"all {total} events in the audit trail",
    )
    assert (
        store.scalar(
            "SELECT count(DISTINCT event_id) FROM audit_log WHERE job_id LIKE 'rebalance%'"
        )
        == total
    )
    # Kafka's committed offsets (what its tools and the monitor read) reach every end.
    wait_until(
        lambda: all(p.lag == 0 for p in group_lag(settings, {AUDITOR: topics}, with_ages=False)),
        60,
        what="no lag in Kafka's committed offsets",
    )


def test_kafka_learns_offsets_the_store_holds_without_a_new_message(
    settings: Settings, store: Store, host_factory: Callable[..., Host]
) -> None:
    """A host that stopped past the broker grace period stored its last batches but could
    not commit them to Kafka. Its successor resumes from the store; where no new message
    arrives it has nothing to commit, and Kafka (the monitor's lag, the operator's tools)
    would show the group behind for good. Here the store holds every offset of a stream
    Kafka never saw committed, and nothing more is produced."""
    from horizons_bench.offsets import OffsetProbe
    from horizons_platform.kafka.admin import end_offsets
    from horizons_platform.store import tables

    group = "notifications"
    run_jobs(settings, "kl", 5)
    topics = group_topics(settings)[group]
    ends = end_offsets(settings, topics)
    assert sum(ends.values()) == 15
    with store.transaction() as con:
        tables.save_offsets(con, group, ends)  # as a previous host stored them
    probe = OffsetProbe(settings, {group: topics})
    assert sum(probe.committed(group).values()) == 0
    host_factory(settings, (group,))
    wait_until(
        lambda: probe.committed(group) == ends, timeout=30, what="Kafka holding the stored offsets"
    )
    # Resumed from the store: nothing of the stream was consumed again.
    assert store.scalar("SELECT count(*) FROM notifications") == 0


def test_a_fenced_member_rejoins_and_resumes_from_the_store(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host]
) -> None:
    """librdkafka can fence its own static member (a session that timed out while the
    coordinator moved, librdkafka#3437): the consumer is then dead for good. CI's
    node-loss drill saw the auditor stop at 1,019 of 20,000 events while the host ran
    on. Here another consumer joins with the host's group.instance.id — Kafka fences
    the host's member the same way — and leaves; the host must rejoin and store every
    event once."""
    from horizons_platform.kafka.consumer import static_member_id

    settings = settings_factory(group_instance_id="fence-test")  # static membership
    store = Store(settings)
    store.ensure_schema()
    topics = group_topics(settings)[AUDITOR]
    instance_id = static_member_id(settings, AUDITOR, topics)
    assert instance_id is not None
    host = host_factory(settings, (AUDITOR,))
    loop = host.loops[AUDITOR]
    before = run_jobs(settings, "fence-a", 10)
    wait_until(
        lambda: store.scalar(f"SELECT count(*) FROM audit_log WHERE {FENCE_JOBS}") == before,
        60,
        what="the first events",
    )

    # Joining under the host's group.instance.id fences the host's member.
    _join_and_leave(settings, topics, **{"group.instance.id": instance_id})

    wait_until(lambda: len(loop._rejoins) == 1, 60, what="the host's member fenced and rejoined")
    after = run_jobs(settings, "fence-b", 10)
    total = before + after
    wait_until(
        lambda: store.scalar(f"SELECT count(*) FROM audit_log WHERE {FENCE_JOBS}") == total,
        60,
        what=f"all {total} events in the audit trail",
    )
    assert (
        store.scalar(f"SELECT count(DISTINCT event_id) FROM audit_log WHERE {FENCE_JOBS}") == total
    )
    assert AUDITOR not in host.exit_codes, "the loop stopped instead of rejoining"
