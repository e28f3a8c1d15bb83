"""A long-running reader holds the DuckDB file: ingest must wait (Kafka is the buffer),
lag must rise, nothing may be lost, and the consumers must catch up once it lets go."""

from __future__ import annotations

import time

from horizons_platform.bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_platform.bench.harness import BenchContext
from horizons_platform.bench.runner import all_caught_up, watch
from horizons_platform.bench.smtp import SmtpSink
from horizons_platform.store.connection import Store


def run(
    ctx: BenchContext, smtp: SmtpSink, hold_s: float = 10.0, rate: float = 500.0, seed: int = 7
) -> FaultOutcome:
    fault = FaultRun(ctx, "dblock", smtp)
    try:
        host = fault.host()
        fault.stream(events=int(rate * (hold_s + 10)), rate=rate, seed=seed)
        time.sleep(3)
        before = fault.probe.snapshot()
        with Store(fault.settings).reader() as con:
            locked_at = time.monotonic()
            ctx.progress.say(f"dblock: holding {fault.settings.database.name} for {hold_s:.0f} s")
            con.execute("SELECT count(*) FROM audit_log").fetchall()
            time.sleep(hold_s)  # the "long-running query"
            during = fault.probe.snapshot()
        released_at = time.monotonic()
        alive = host.alive
        fault.wait_traffic()
        timeline = watch(
            fault.probe,
            host,
            until=all_caught_up(fault.groups),
            timeout=300,
            progress=ctx.progress,
            label="dblock: catching up",
        )
        caught_up_s = timeline.samples[-1].t - (released_at - timeline.t0)
        verification = fault.finish()
    finally:
        fault.stop_all()
    lag_before = sum(s.lag for s in before.values())
    lag_during = sum(s.lag for s in during.values())
    return fault.outcome(
        f"DuckDB held by a reader for {hold_s:.0f} s",
        verification,
        [
            Check(
                "lag rose while the file was held",
                lag_during > lag_before,
                f"{lag_before} → {lag_during} messages",
            ),
            Check("host kept running (waited on the lock)", alive),
            Check(
                "caught up within 2 min of the release",
                caught_up_s < 120,
                f"{max(0.0, caught_up_s):.1f} s",
            ),
        ],
        {
            "held_s": round(released_at - locked_at, 1),
            "lag_before": lag_before,
            "lag_during": lag_during,
            "catch_up_s": round(max(0.0, caught_up_s), 1),
        },
    )
