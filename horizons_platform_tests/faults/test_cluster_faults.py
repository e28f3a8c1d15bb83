"""Kafka nodes killed under live consumers, on a private 3-node KRaft cluster (free
ports, own data) so the session broker is never touched."""

from __future__ import annotations

import pytest

from horizons_bench.faults import nodes
from horizons_bench.harness import BenchContext
from horizons_bench.smtp import SmtpSink

pytestmark = pytest.mark.faults  # minutes each: CI (./dev test --all), not the default run


def test_node_losses_lose_nothing_and_raise_and_recover_an_alert(
    bench: BenchContext, sink: SmtpSink
) -> None:
    outcome = nodes.run(bench, sink, events=20_000, rate=500.0, kills=(2, 3))
    print(outcome.render())
    print(outcome.details["drills"])
    assert outcome.details["produced"]["failed"] == 0
    assert outcome.verification.doubled == 0, outcome.render()
    assert outcome.details["alerts_raised"] >= 2
    assert outcome.details["alerts_recovered"] == outcome.details["alerts_raised"]
    assert outcome.ok, "\n".join([*outcome.problems(), outcome.render()])
    assert outcome.verification.ok
