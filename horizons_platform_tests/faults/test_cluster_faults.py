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
    "open defect (issue 13): after a node that coordinated a group is killed and brought "
    "back, that group's committed offsets in Kafka can stop advancing while DuckDB holds "
    "every row (verified); the drill's catch-up and the monitor's lag read Kafka's "
    "offsets, so they never complete. Re-sending failed or unacknowledged commits did not "
    "cure it (branch wip/commit-path-latency)"
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
    if failed == {CATCH_UP} and outcome.verification.ok:  # never excuses a lost row
        pytest.xfail(STALL_AFTER_SECOND_LOSS)
    assert outcome.ok, "\n".join([*outcome.problems(), outcome.render()])
    assert outcome.verification.ok
