"""`/metrics` in Prometheus text format, served by the consumer host on
``127.0.0.1:HORIZONS_METRICS_PORT`` (default 9464).

Counters and histograms are updated where the work happens (the consumer loop, the
store, the outbox); lag, outbox depth, pending publications and the signed head's age
are measured when Prometheus scrapes, the way kafka-lag-exporter does, so a scrape
always sees the broker's current high watermarks against the groups' committed offsets.
Each host has its own registry (tests run several hosts in one process).
"""

from __future__ import annotations

import bisect
import collections
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from horizons_platform.kafka.admin import group_lag
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# produce → stored, in ms: 10 ms wide up to 200 ms (the 150 ms target), 25 ms to 500 ms
# (the e-mail target), so a quantile read from the buckets is that close to the true one.
STORED_BUCKETS_MS = (
    *range(10, 201, 10),
    *range(225, 501, 25),
    *(600, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 30_000, 60_000),
)


class HostMetrics:
    def __init__(self, settings: Settings, store: StoreBase, groups: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "horizons_consumed",
            "Messages polled, per group and topic",
            ["group", "topic"],
            registry=r,
        )
        self.stored = Counter(
            "horizons_stored",
            "Messages whose batch (rows and offsets) was committed to the store",
            ["group", "topic"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "horizons_dead_lettered", "Messages dead-lettered", ["group", "topic"], registry=r
        )
        self.batch_seconds = Histogram(
            "horizons_batch_seconds",
            "A batch from poll to its commit in the store",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "horizons_commit_seconds",
            "A batch's store transaction (rows, dead letters, offsets)",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_transaction_seconds = Histogram(
            "horizons_store_transaction_seconds",
            "Every write transaction on the store, by thread role",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_checkpoint_seconds = Histogram(
            "horizons_store_checkpoint_seconds",
            "DuckDB checkpoints (the WAL written into the database file): the transaction "
            "that saw each one, BEGIN to COMMIT; every writer's transaction waited for it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_checkpoint_bytes = Counter(
            "horizons_store_checkpoint_wal_bytes",
            "WAL bytes written into the database file by checkpoints",
            registry=r,
        )
        self.outbox_send_seconds = Histogram(
            "horizons_outbox_send_seconds",
            "One e-mail handed to the SMTP server",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_sent = Counter(
            "horizons_outbox_sent", "E-mails sent, by outcome", ["outcome"], registry=r
        )
        self.produce_to_stored = ProduceToStored()
        r.register(self.produce_to_stored)
        r.register(_Live(settings, store, list(groups)))
        self.port: int | None = None

    def serve(self, port: int) -> int:
        """Serve on 127.0.0.1:``port`` (0: any free port); returns the port."""
        server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port = int(server.server_port)
        return self.port

    def observe_batch(
        self,
        group: str,
        topics: list[str],
        started: float,
        commit_started: float,
        timestamps: list[int] | None = None,
    ) -> None:
        done = time.monotonic()
        self.batch_seconds.labels(group).observe(done - started)
        self.commit_seconds.labels(group).observe(done - commit_started)
        if timestamps:
            self.produce_to_stored.observe(group, timestamps, time.time() * 1000)
        for topic, n in count_by_topic(topics).items():
            self.stored.labels(group, topic).inc(n)

    def observe_dead_letters(self, group: str, topics: list[str]) -> None:
        for topic, n in count_by_topic(topics).items():
            self.dead_lettered.labels(group, topic).inc(n)

    def observe_consumed(self, group: str, topics: list[str]) -> None:
        for topic, n in count_by_topic(topics).items():
            self.consumed.labels(group, topic).inc(n)

    def observe_checkpoint(self, wal_bytes: int, seconds: float) -> None:
        self.store_checkpoint_seconds.observe(seconds)
        self.store_checkpoint_bytes.inc(wal_bytes)

    def observe_transaction(self, seconds: float, thread_name: str) -> None:
        # "store-metrics_0" → "store-metrics": one series per kind of writer.
        self.store_transaction_seconds.labels(re.sub(r"_\d+$", "", thread_name)).observe(seconds)


def count_by_topic(values: list[str]) -> dict[str, int]:
    return collections.Counter(values)


class ProduceToStored(Collector):
    """Each record's age when its batch was committed to the store: now − its Kafka
    timestamp (the producer's CreateTime), per group — the platform's end-to-end latency
    to durable, at the commit itself rather than sampled from outside.

    Counted a batch at a time: the batch's timestamps are sorted (C) and each bucket's
    count is one bisection, so a 5,000-record batch costs microseconds, not a Python
    observe() per record on the hot path."""

    def __init__(self, buckets_ms: tuple[int, ...] = STORED_BUCKETS_MS) -> None:
        self.buckets_ms = buckets_ms
        self._lock = threading.Lock()
        # group → cumulative counts per bucket (records at most that old), total, sum (ms)
        self._counts: dict[str, list[int]] = {}
        self._total: dict[str, int] = collections.Counter()
        self._sum_ms: dict[str, float] = collections.defaultdict(float)

    def observe(self, group: str, timestamps_ms: list[int], now_ms: float) -> None:
        stamps = sorted(timestamps_ms)
        first = bisect.bisect_right(stamps, 0)  # -1: a record without a timestamp
        n = len(stamps) - first
        if not n:
            return
        # Age ≤ le  ⇔  timestamp ≥ now − le.
        within = [len(stamps) - bisect.bisect_left(stamps, now_ms - le) for le in self.buckets_ms]
        with self._lock:
            counts = self._counts.setdefault(group, [0] * len(self.buckets_ms))
            for i, c in enumerate(within):
                counts[i] += c
            self._total[group] += n
            self._sum_ms[group] += n * now_ms - sum(stamps[first:])

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "horizons_produce_to_stored_seconds",
            "A record's age (now minus its Kafka timestamp) when its batch was committed "
            "to the store",
            labels=["group"],
        )
        with self._lock:
            snapshot = {
                g: (list(c), self._total[g], self._sum_ms[g]) for g, c in self._counts.items()
            }
        for group, (counts, total, sum_ms) in sorted(snapshot.items()):
            buckets = [(f"{le / 1000:g}", c) for le, c in zip(self.buckets_ms, counts, strict=True)]
            family.add_metric([group], [*buckets, ("+Inf", total)], sum_ms / 1000)
        yield family


class _Live(Collector):
    """Measured at scrape time: lag, outbox depth, pending publications, head age."""

    def __init__(self, settings: Settings, store: StoreBase, groups: list[str]) -> None:
        self.settings = settings
        self.store = store
        self.groups = groups
        # Per partition, (high watermark, when seen) from earlier scrapes: the age of a
        # group's oldest uncommitted message is estimated from when the partition's end
        # first passed it (kafka-lag-exporter's method) — no record fetched per scrape.
        self._seen: dict[tuple[str, int], deque[tuple[int, float]]] = {}

    def _age(self, topic: str, partition: int, committed: int, high: int, now: float) -> float:
        history = self._seen.setdefault((topic, partition), deque(maxlen=240))
        if not history or history[-1][0] != high:
            history.append((high, now))
        if high <= committed:
            return 0.0
        for end, seen in history:
            if end > committed:
                return now - seen
        return 0.0

    def describe(self) -> list[Metric]:
        return []  # measured per scrape; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "kafka_consumergroup_group_lag",
            "Messages between a group's committed offset and the partition's end",
            labels=["group", "topic", "partition"],
        )
        age = GaugeMetricFamily(
            "kafka_consumergroup_group_lag_seconds",
            "Age of the oldest message a group has not committed yet",
            labels=["group", "topic", "partition"],
        )
        reachable = GaugeMetricFamily(
            "horizons_broker_reachable", "1 when the broker answered this scrape"
        )
        topics = {g: t for g, t in group_topics(self.settings).items() if g in self.groups}
        try:
            now = time.monotonic()
            for p in group_lag(self.settings, topics, timeout=5.0, with_ages=False):
                labels = [p.group, p.topic, str(p.partition)]
                lag.add_metric(labels, p.lag)
                age.add_metric(labels, self._age(p.topic, p.partition, p.committed, p.high, now))
            reachable.add_metric([], 1)
        except (KafkaException, RuntimeError) as exc:
            log.warning("metrics: lag not measured (broker unreachable?): %s", exc)
            reachable.add_metric([], 0)
        yield lag
        yield age
        yield reachable
        try:
            yield from self._store_gauges()
        except Exception as exc:  # the store may be failing: the scrape still answers
            log.warning("metrics: store gauges not measured: %s", exc)

    def _store_gauges(self) -> Iterator[Metric]:
        with self.store.reader() as con:
            depth, publications, head = con.execute(
                "SELECT (SELECT count(*) FROM notification_queue), "
                "(SELECT count(*) FROM publications), (SELECT max(signed_at) FROM audit_heads)"
            ).fetchall()[0]
        yield _gauge("horizons_outbox_depth", "Notifications waiting to be sent", depth)
        yield _gauge(
            "horizons_publications_pending",
            "Alerts and audit records waiting for Kafka (the publication outbox)",
            publications,
        )
        if head is not None:
            yield _gauge(
                "horizons_audit_signed_head_age_seconds",
                "Seconds since the audit chain's newest signed head",
                (datetime.now(UTC) - head).total_seconds(),
            )


def _gauge(name: str, text: str, value: Any) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text)
    g.add_metric([], float(value))
    return g
