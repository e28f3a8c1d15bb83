"""The consumer host's own /metrics, read by the benchmarks.

``horizons_produce_to_stored_seconds`` is measured by the host at each DuckDB commit
(now − the record's Kafka timestamp): the exact produce → stored latency, where the
committed offsets a benchmark samples from the broker are an upper bound (the Kafka
commit's round trip and the sampling interval come on top).
"""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Buckets = list[tuple[float, float]]  # (upper bound in seconds, cumulative count)
STORED = "horizons_produce_to_stored_seconds"
CHECKPOINT = "horizons_store_checkpoint_seconds"
CHECKPOINT_BYTES = "horizons_store_checkpoint_wal_bytes"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def histogram(text: str, name: str, by: str | None = None) -> dict[str, Buckets]:
    """A histogram's cumulative buckets per value of its label ``by`` (one series, keyed
    "", without one)."""
    out: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])  # "+Inf" → inf
                out.setdefault(sample.labels[by] if by else "", []).append((le, sample.value))
    return {key: sorted(b, key=lambda x: x[0]) for key, b in out.items()}


def stored_buckets(text: str) -> dict[str, Buckets]:
    """Per group, the produce → stored histogram's cumulative buckets."""
    return histogram(text, STORED, by="group")


def checkpoints(text: str) -> tuple[Buckets, float, float]:
    """DuckDB checkpoints so far: the commit-time histogram's cumulative buckets, the
    seconds those commits took in all, and the WAL bytes they wrote."""
    total = wal = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{CHECKPOINT}_sum":
                total = sample.value
            elif sample.name == f"{CHECKPOINT_BYTES}_total":
                wal = sample.value
    return histogram(text, CHECKPOINT).get("", []), total, wal


def longest(buckets: Buckets) -> float | None:
    """The upper bound of the highest non-empty bucket (None when none counted)."""
    found, previous = None, 0.0
    for upper, count in buckets:
        if count > previous:
            found = upper
        previous = count
    return found


def between(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, Buckets]:
    """What was counted between two scrapes (the measured window only), per series."""
    return {key: window(before.get(key, []), buckets) for key, buckets in after.items()}


def window(before: Buckets, after: Buckets) -> Buckets:
    """One series' buckets counted between two scrapes."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def bucket_width_at(buckets: Buckets, value_s: float) -> float:
    """How wide the bucket holding ``value_s`` is (the quantile's resolution there)."""
    lower = 0.0
    for upper, _ in buckets:
        if value_s <= upper:
            return math.inf if math.isinf(upper) else upper - lower
        lower = upper
    return math.inf
