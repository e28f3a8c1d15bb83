"""A client holds a read snapshot of the store open for a long time (an analyst's session
or a backup): ingest must carry on beside it (the owner serves the snapshot under MVCC),
the snapshot must stay consistent, and nothing may be lost.

Before the store had one owner this held the file lock and ingest stopped; the name of
the scenario stays for continuity with older bench results."""

from __future__ import annotations

import time

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext
from horizons_bench.runner import all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_platform.store.client import Store

COUNT = "SELECT count(*) FROM audit_log"


def run(
    ctx: BenchContext, smtp: SmtpSink, hold_s: float = 10.0, rate: float = 500.0, seed: int = 7
) -> FaultOutcome:
    fault = FaultRun(ctx, "dblock", smtp)
    try:
        host = fault.host()
        fault.stream(events=int(rate * (hold_s + 10)), rate=rate, seed=seed)
        time.sleep(3)  # into the stream before the snapshot opens (a moment, not a sync)
        store = Store(fault.settings)
        before = fault.probe.snapshot()
        with store.snapshot() as con:
            opened_at = time.monotonic()
            ctx.progress.say(f"dblock: a client holds a snapshot for {hold_s:.0f} s")
            first = con.execute(COUNT).fetchall()[0][0]
            time.sleep(hold_s)  # the long-running session
            last = con.execute(COUNT).fetchall()[0][0]
            during = fault.probe.snapshot()
        held_s = time.monotonic() - opened_at
        live = store.scalar(COUNT)
        alive = host.alive
        fault.wait_traffic()
        watch(
            fault.probe,
            host,
            until=all_caught_up(fault.groups),
            timeout=300,
            progress=ctx.progress,
            label="dblock: catching up",
        )
        verification = fault.finish()
    finally:
        fault.stop_all()
    lag_before = sum(s.lag for s in before.values())
    lag_during = sum(s.lag for s in during.values())
    done_before = sum(s.done for s in before.values())
    done_during = sum(s.done for s in during.values())
    # A second of traffic per group is the most lag an unstalled host builds up.
    allowed = lag_before + int(rate * len(fault.groups))
    return fault.outcome(
        f"a client held a read snapshot for {hold_s:.0f} s",
        verification,
        [
            Check(
                "ingest kept committing while the snapshot was open",
                done_during > done_before and lag_during <= allowed,
                f"committed {done_before:,} → {done_during:,}; lag {lag_before} → "
                f"{lag_during} (allowed ≤ {allowed})",
            ),
            Check(
                "the snapshot stayed consistent while rows arrived",
                first == last and (live or 0) > last,
                f"{first} = {last} inside it, {live} outside afterwards",
            ),
            Check("host kept running", alive),
        ],
        {
            "held_s": round(held_s, 1),
            "lag_before": lag_before,
            "lag_during": lag_during,
            "snapshot_rows": last,
            "rows_after": live,
        },
    )
