"""produce → stored, as the host counts it at each commit and the bench reads it back:
bucket counts from a batch's timestamps, the text format, quantiles from the buckets."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from horizons_bench import hostmetrics
from horizons_bench.stats import histogram_quantile
from horizons_platform.runtime.prometheus import ProduceToStored


def exposition(collector: ProduceToStored) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_a_batch_is_counted_by_each_records_age_at_the_commit() -> None:
    h = ProduceToStored(buckets_ms=(10, 50, 100))
    now = 1_000_000.0
    # ages 5, 10, 30, 80, 500 ms; a record without a timestamp (-1) is not counted
    h.observe("metrics", [int(now - a) for a in (30, 5, 500, 10, 80)] + [-1], now)
    h.observe("metrics", [int(now - 60)], now)
    buckets = hostmetrics.stored_buckets(exposition(h))["metrics"]
    assert buckets == [(0.01, 2), (0.05, 3), (0.1, 5), (math.inf, 6)]
    assert 'horizons_produce_to_stored_seconds_sum{group="metrics"} 0.685' in exposition(h)


def test_only_the_window_between_two_scrapes_is_measured() -> None:
    h = ProduceToStored(buckets_ms=(10, 100))
    h.observe("auditor", [995], 1000.0)
    before = hostmetrics.stored_buckets(exposition(h))
    h.observe("auditor", [900, 990], 1000.0)
    after = hostmetrics.stored_buckets(exposition(h))
    assert hostmetrics.between(before, after)["auditor"] == [(0.01, 1), (0.1, 2), (math.inf, 2)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 0.0875),  # rank 5 of 10: the 3rd of the 4 in (0.05, 0.1] → 3/4 of the way
        (0.2, 0.05),
        (0.1, 0.025),
        (0.99, 0.1),  # in +Inf: the highest finite bound
    ],
)
def test_quantiles_interpolate_within_the_bucket_like_prometheus(q: float, expected: float) -> None:
    buckets = [(0.05, 2.0), (0.1, 6.0), (math.inf, 10.0)]
    # ranks: 1..2 ≤ 50 ms, 3..6 ≤ 100 ms, 7..10 above
    assert histogram_quantile(buckets, q) == pytest.approx(expected)


def test_no_records_no_quantile() -> None:
    assert histogram_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.99) is None
    assert histogram_quantile([], 0.5) is None


def test_the_bench_reads_the_hosts_checkpoints_between_two_scrapes() -> None:
    """The host's checkpoint counters, read back as the latency bench reads them: how
    many fell in the window, the WAL they wrote and the longest one's bucket."""
    registry = CollectorRegistry()
    seconds = Histogram(
        "horizons_store_checkpoint_seconds", "", buckets=(0.5, 1.0, 2.5), registry=registry
    )
    wal = Counter("horizons_store_checkpoint_wal_bytes", "", registry=registry)
    seconds.observe(0.3)
    wal.inc(100)
    before = hostmetrics.checkpoints(generate_latest(registry).decode())
    seconds.observe(2.2)
    seconds.observe(0.7)
    wal.inc(5_000)
    after = hostmetrics.checkpoints(generate_latest(registry).decode())
    window = hostmetrics.between({"": before[0]}, {"": after[0]})[""]
    assert window == [(0.5, 0), (1.0, 1), (2.5, 2), (math.inf, 2)]
    assert hostmetrics.longest(window) == 2.5
    assert after[1] - before[1] == pytest.approx(2.9)
    assert after[2] - before[2] == 5_000
    assert hostmetrics.longest([(0.5, 0), (math.inf, 0)]) is None
