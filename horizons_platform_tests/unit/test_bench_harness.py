"""Pure pieces of `horizons bench`: statistics, targets, timelines, verification maths,
settings passed to subprocesses. No broker."""

from __future__ import annotations

import time
from typing import Any

import pytest

from horizons_bench.harness import ephemeral_ports, free_port_block, settings_env
from horizons_bench.latency import stored_target
from horizons_bench.memory import processed, rss_level
from horizons_bench.offsets import GroupState
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.runner import Sample, Timeline
from horizons_bench.stats import growth_pct, percentile, summary_ms
from horizons_bench.verify import TableCount
from horizons_bench.workload import LedgerPublisher, encode_jobs, replay
from horizons_platform import events as ev
from horizons_platform.settings import Settings


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 99) is None
    assert summary_ms([0.1, 0.2]) == {
        "n": 2,
        "p50_ms": 100.0,
        "p95_ms": 200.0,
        "p99_ms": 200.0,
        "max_ms": 200.0,
    }


def test_targets_and_growth() -> None:
    assert Target("ge", 50_000).met(60_000) is True
    assert Target("le", 150).met(151) is False
    assert Target("eq", 0).met(0) is True
    assert Target("ge", 1).met(None) is None
    assert str(Target("ge", 50_000)) == "≥ 50,000"
    assert growth_pct(100, 110) == 10
    assert growth_pct(None, 110) is None


def _sample(t: float, done: int, total: int = 1000) -> Sample:
    return Sample(t, {"g": GroupState(done, total)}, None)


def test_the_latency_target_is_the_issues_for_the_rate() -> None:
    # 150 ms at 1,000 events/s, 500 ms at 10,000 (the 10,000 run showed 150 before).
    assert stored_target(1_000) == Target("le", 150)
    assert stored_target(10_000) == Target("le", 500)
    assert stored_target(20_000) is None


def test_timeline_rate_excludes_start_up_and_stops_at_catch_up() -> None:
    timeline = Timeline(
        0.0, [_sample(0, 0), _sample(1, 100), _sample(3, 500), _sample(5, 1000), _sample(9, 1000)]
    )
    assert timeline.steady_rate("g") == (1000 - 100) / (5 - 1)
    assert [w["rate"] for w in timeline.windows("g", 2.0)] == [200.0, 250.0]


def test_lost_and_doubled_are_counted_on_distinct_rows() -> None:
    assert TableCount("job_events", expected=10, stored=12, distinct=9).doubled == 3
    assert TableCount("job_events", expected=10, stored=12, distinct=9).lost == 1
    assert TableCount("job_events", expected=10, stored=11, distinct=11).extra == 1
    audit = TableCount("audit_log", 10, 15, 15, covered=10, extra_allowed=True)
    assert (audit.lost, audit.doubled, audit.extra) == (0, 0, 0)


def test_settings_survive_the_trip_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Settings(broker_grace_s=7.5, smtp_starttls=True, topic_job_lifecycle="x-lc")
    for key, value in settings_env(original).items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_result_table_shows_targets_and_ratios() -> None:
    result = BenchResult("ingest", params={})
    result.add(Figure("auditor alone", 12_345.6, "events/s", Target("ge", 50_000), 0.12, 0.5))
    text = result.table()
    assert "auditor alone" in text and "12,346" in text and "NO" in text and "0.12×" in text
    assert not result.ok


def test_rss_level_is_a_median_over_the_slowest_groups_progress() -> None:
    def sample(i: int) -> Sample:
        states = {"fast": GroupState(1000, 1000), "slow": GroupState(i * 10, 1000)}
        return Sample(float(i), states, (100 + i) * 2**20)

    timeline = Timeline(0.0, [sample(i) for i in range(101)])
    assert processed(timeline.samples[50], 10_000) == 5_000  # the slow group's share
    assert rss_level(timeline, 10_000, 4_000, 6_000) == 150 * 2**20
    assert rss_level(timeline, 10_000, 20_000, 30_000) is None


def test_port_blocks_stay_out_of_the_ephemeral_range() -> None:
    """A broker node restarted on its port must not find it taken by some client's
    outgoing connection (the kernel gives those ports from the ephemeral range)."""
    low, high = ephemeral_ports()
    for _ in range(50):
        base = free_port_block(6)
        assert base + 5 < low or base > high


def test_encoded_jobs_are_the_orchestrators_messages() -> None:
    settings = Settings()
    messages = encode_jobs(settings, 400, seed=3)
    assert 380 <= len(messages) <= 420
    topics = {settings.topic_job_lifecycle, settings.topic_job_metrics}
    assert {m.topic for m in messages} == topics
    for m in messages:
        event = ev.decode(m.value)  # what the consumers will validate
        assert m.kind == event.event_type
        assert m.key == event.job_id
        assert dict(m.headers)["event_type"] == event.event_type.encode()
    # Every job starts with its submission, in the order the orchestrator sent them.
    first_seen: dict[str, str] = {}
    for m in messages:
        first_seen.setdefault(str(m.key), m.kind)
    assert set(first_seen.values()) == {ev.JOB_SUBMITTED}


class _Counting(LedgerPublisher):
    """Records when each message was handed over; sends nothing."""

    def __init__(self) -> None:  # no super(): no Kafka client
        self.at: list[float] = []
        self.flushed = False

    def send_async(self, topic: str, value: bytes | None, **_: Any) -> None:
        self.at.append(time.monotonic())

    def flush(self, timeout: float | None = None) -> int:
        self.flushed = True
        return 0


def test_replay_keeps_the_rate_and_flushes() -> None:
    messages = encode_jobs(Settings(), 300, seed=5)
    publisher = _Counting()
    started = time.monotonic()
    assert replay(publisher, messages, rate=1000.0) == len(messages)
    assert len(publisher.at) == len(messages) and publisher.flushed
    # Message i goes out no earlier than one tick (2 ms) before its due time.
    for i, at in enumerate(publisher.at):
        assert at >= started + i / 1000.0 - 0.0025
