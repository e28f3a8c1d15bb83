"""The owner host killed five times mid-stream while a hot standby waits for the store."""

from __future__ import annotations

import pytest

from horizons_bench.faults import failover
from horizons_bench.harness import BenchContext
from horizons_bench.smtp import SmtpSink

pytestmark = pytest.mark.faults  # minutes each: CI (./dev test --all), not the default run


def test_standby_takes_over_five_kills_and_nothing_is_lost_or_doubled(
    bench: BenchContext, sink: SmtpSink
) -> None:
    outcome = failover.run(bench, sink, kills=5, rate=300.0)
    print(outcome.render())
    print("takeover:", outcome.details["takeover_ms"], "file:", outcome.details["file_taken_ms"])
    assert outcome.ok, "\n".join([*outcome.problems(), outcome.render()])
    assert outcome.details["takeover_ms"]["n"] == 5
    assert outcome.verification.lost == 0 and outcome.verification.doubled == 0
