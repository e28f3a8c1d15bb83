"""Kafka nodes killed under live consumers, on a private 3-node KRaft cluster (free
ports, own data) so the session broker is never touched."""

from __future__ import annotations

import pytest

from horizons_bench.faults import nodes
from horizons_bench.harness import BenchContext
from horizons_bench.smtp import SmtpSink

pytestmark = pytest.mark.faults  # minutes each: CI (./dev test --all), not the default run

CATCH_UP = "consumers caught up at the end"
STALL_AFTER_SECOND_LOSS = (
    "open defect (issue 13): after the second node loss a consumer group's progress, as "
    "Kafka's committed offsets show it, can stall for minutes (lag alerts at 60 s; seen "
    "in 2 of 6 runs, the last two); the drill then ends before every group caught up. "
    "Not yet diagnosed — a controller quorum still catching up with the restarted node "
    "when the next one is killed is the leading suspect"
)


def test_node_losses_lose_nothing_and_raise_and_recover_an_alert(
    bench: BenchContext, sink: SmtpSink
) -> None:
    outcome = nodes.run(bench, sink, events=20_000, rate=500.0, kills=(2, 3))
    print(outcome.render())
    print(outcome.details["drills"])
    # Whatever else happened: every message acknowledged, nothing stored twice, and the
    # under-replication alert raised and recovered for each loss.
    assert outcome.details["produced"]["failed"] == 0
    assert outcome.verification.doubled == 0, outcome.render()
    assert outcome.details["alerts_raised"] >= 2
    assert outcome.details["alerts_recovered"] == outcome.details["alerts_raised"]
    failed = {c.what for c in outcome.checks if not c.ok}
    if failed == {CATCH_UP}:
        pytest.xfail(STALL_AFTER_SECOND_LOSS)
    assert outcome.ok, "\n".join([*outcome.problems(), outcome.render()])
    assert outcome.verification.ok
