"""The host's Prometheus /metrics during a stream (issue 14): lag per group and partition
as the broker sees it, counters and histograms from the loop, the store and the outbox."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable

from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from horizons_bench.stats import histogram_quantile
from horizons_platform.host import Host
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.waiting import wait_until


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


class BrokerLag:
    """What kafka-consumer-groups prints as LAG (end offset − committed offset), summed per
    group, read through one consumer per group kept open (a reading takes milliseconds)."""

    def __init__(self, settings: Settings, topics: dict[str, list[str]]) -> None:
        self.consumers = {g: Consumer(settings.kafka_config(**{"group.id": g})) for g in topics}
        any_consumer = next(iter(self.consumers.values()))
        meta = any_consumer.list_topics(timeout=10).topics
        self.tps = {
            g: [TopicPartition(t, p) for t in ts for p in meta[t].partitions]
            for g, ts in topics.items()
        }

    def read(self, group: str) -> tuple[int, int]:
        """(sum of end offsets, sum of committed offsets) of the group's partitions."""
        consumer = self.consumers[group]
        ends = committed = 0
        for tp in consumer.committed(self.tps[group], timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            ends += high
            committed += tp.offset if tp.offset >= 0 else low
        return ends, committed

    def lag(self, group: str) -> int:
        ends, committed = self.read(group)
        return ends - committed

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()


def test_metrics_show_each_groups_lag_as_the_broker_does_during_a_stream(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host]
) -> None:
    settings = settings_factory(audit_head_interval_s=0.5)
    host = host_factory(settings)
    assert host.metrics.port
    jobs = plan(2000, seed=5, prefix="prom")  # ~20 s at 400 events/s
    stream = threading.Thread(
        target=run_simulation,
        args=(JobOrchestratorService(settings, recover=False, wait=False), jobs),
        kwargs={"rate": 400.0},  # events/s
        daemon=True,
    )
    stream.start()
    topics = group_topics(settings)
    broker = BrokerLag(settings, topics)
    compared = 0
    try:
        while stream.is_alive() and compared < 3:
            before = {g: broker.read(g) for g in topics}
            scraped = _scrape(host.metrics.port)
            after = {g: broker.read(g) for g in topics}
            lag: dict[str, float] = {}
            for labels, value in scraped["kafka_consumergroup_group_lag"]:
                lag[labels["group"]] = lag.get(labels["group"], 0) + value
            assert set(lag) == set(topics)
            for group in topics:
                # End and committed offsets only grow: whenever during the scrape the host
                # measured, its lag lies between these two bounds read from the broker.
                low = before[group][0] - after[group][1]
                high = after[group][0] - before[group][1]
                print(f"{group}: scraped lag {lag[group]:.0f}, broker says {low}..{high}")
                assert low <= lag[group] <= high, group
            compared += 1
        assert compared >= 1, "the stream ended before /metrics could be compared with it"
        stream.join(60)
        wait_until(
            lambda: all(broker.lag(g) == 0 for g in topics), 60, what="every group to catch up"
        )
    finally:
        broker.close()
    # Caught up, the scrape says so too (the platform's own heads and announcements keep
    # arriving on audit-trail and system-health, so this is waited for, not sampled once).
    wait_until(
        lambda: all(v == 0 for _, v in _scrape(host.metrics.port)["kafka_consumergroup_group_lag"]),
        60,
        what="/metrics to show no lag",
    )
    final = _scrape(host.metrics.port)
    stored = {(labels["group"], labels["topic"]): v for labels, v in final["horizons_stored_total"]}
    assert stored[("metrics", settings.topic_job_lifecycle)] > 0
    assert stored[("compliance-auditor", settings.topic_job_lifecycle)] > 0
    commits = {labels["group"]: v for labels, v in final["horizons_commit_seconds_count"]}
    assert set(commits) >= set(topics)
    assert any(v > 0 for _, v in final["horizons_store_transaction_seconds_count"])
    assert final["horizons_broker_reachable"][0][1] == 1
    assert "horizons_outbox_depth" in final and "horizons_publications_pending" in final
    assert final["horizons_audit_signed_head_age_seconds"][0][1] < 60
    assert sum(v for _, v in final.get("horizons_outbox_sent_total", [])) > 0
    # produce → stored, counted at each commit: at least every record of the stream (the
    # platform's own topics keep growing), and a median in seconds that is plausible: more
    # than nothing, less than 5 s (a unit or clock mistake is off by ~1,000×).
    counted = final["horizons_produce_to_stored_seconds_count"]
    latency = {labels["group"]: v for labels, v in counted}
    streamed = (settings.topic_job_lifecycle, settings.topic_job_metrics)
    for group in topics:
        assert latency[group] >= sum(stored.get((group, t), 0) for t in streamed), group
        assert latency[group] > 0, group
    for group in topics:
        buckets = [
            (float(labels["le"]), v)
            for labels, v in final["horizons_produce_to_stored_seconds_bucket"]
            if labels["group"] == group
        ]
        median = histogram_quantile(sorted(buckets), 0.5)
        print(f"{group}: produce → stored p50 {median * 1000:.0f} ms" if median else group)
        assert median is not None and 0 < median < 5.0, group
