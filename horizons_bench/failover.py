"""`horizons bench failover`: kill the owner host N times mid-stream while a hot standby
waits (the scenario is :mod:`horizons_bench.faults.failover`); report takeover time and
produced vs stored."""

from __future__ import annotations

from horizons_bench.faults import failover
from horizons_bench.harness import BenchContext
from horizons_bench.report import BenchResult, Figure
from horizons_bench.smtp import SmtpSink


def run(ctx: BenchContext, kills: int = 5, rate: float = 400.0, seed: int = 7) -> BenchResult:
    result = BenchResult("failover", params={"kills": kills, "rate": rate, "seed": seed})
    with SmtpSink() as smtp:
        outcome = failover.run(ctx, smtp, kills=kills, rate=rate, seed=seed)
    print(outcome.render())
    t = outcome.details["takeover_ms"]
    f = outcome.details["file_taken_ms"]
    result.figures += [
        Figure("takeover p50 (kill → standby's consumers ready)", t["p50_ms"], "ms"),
        Figure("takeover max", t["max_ms"], "ms"),
        Figure("  of which kill → file taken, p50", f["p50_ms"], "ms"),
        Figure("  of which kill → file taken, max", f["max_ms"], "ms"),
        Figure("produced (acknowledged)", outcome.details["produced"]["acknowledged"], "events"),
        Figure("lost", outcome.verification.lost, "rows"),
        Figure("doubled", outcome.verification.doubled, "rows"),
    ]
    result.passed = outcome.ok
    result.details = outcome.as_dict()
    return result
