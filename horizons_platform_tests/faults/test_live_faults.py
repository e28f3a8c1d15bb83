"""Fault injection against live `horizons consume` subprocesses on the session broker.

Each test prints its produced-vs-stored table (visible with ``-s`` or on failure) and
asserts nothing was lost, doubled or crashed.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from horizons_bench.faults import dblock, kills, poison, smtp_down
from horizons_bench.faults.common import FaultOutcome
from horizons_bench.harness import BenchContext
from horizons_bench.smtp import SmtpSink
from horizons_platform_tests.faults.strategies import payloads

pytestmark = pytest.mark.faults  # minutes each: CI (./dev test --all), not the default run


def _judge(outcome: FaultOutcome) -> None:
    print(outcome.render())
    assert outcome.ok, "\n".join([*outcome.problems(), outcome.render()])


def test_repeated_sigkill_of_the_host_loses_and_doubles_nothing(
    bench: BenchContext, sink: SmtpSink
) -> None:
    _judge(kills.run(bench, sink, kills=3))


def test_a_client_holding_a_snapshot_never_stalls_ingest(
    bench: BenchContext, sink: SmtpSink
) -> None:
    _judge(dblock.run(bench, sink, hold_s=10.0))


def test_smtp_down_for_10s_every_notification_is_still_delivered(
    bench: BenchContext, sink: SmtpSink
) -> None:
    _judge(smtp_down.run(bench, sink, down_s=10.0))


@settings(
    max_examples=2,
    phases=[Phase.generate],  # every example is a live run: no shrinking marathon
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(st.lists(payloads, min_size=100, max_size=150))
def test_random_bytes_and_json_through_a_live_consumer(
    bench: BenchContext, garbage: list[bytes]
) -> None:
    inputs: list[tuple[str, bytes | None]] = [("fuzz", p) for p in garbage]
    with SmtpSink() as sink:  # one per example: the e-mail count is per run
        _judge(poison.run(bench, sink, inputs, "hypothesis garbage", tag="fuzz"))


def test_hostile_edge_cases_are_dead_lettered_and_audited(
    bench: BenchContext, sink: SmtpSink
) -> None:
    _judge(poison.run(bench, sink, poison.hostile_inputs(), "hostile edge cases", tag="hostile"))


def test_an_oversized_message_does_not_crash_the_consumers(
    bench: BenchContext, sink: SmtpSink
) -> None:
    _judge(poison.run(bench, sink, poison.oversized_inputs(), "oversized", tag="oversized"))
