"""SIGKILL the consumer host again and again while events stream in; restart it each time.

A kill lands at a random moment 0.3–2 s after the host is ready, i.e. while it works
through the backlog that built up during the restart: mid-batch, mid-transaction,
mid-SMTP-session. Afterwards a last host catches up and the store must hold every event
exactly once (e-mails may be re-sent with the same Message-ID: SMTP is at-least-once).
"""

from __future__ import annotations

import random
import time

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import summary_ms


def run(
    ctx: BenchContext, smtp: SmtpSink, kills: int = 20, rate: float = 400.0, seed: int = 7
) -> FaultOutcome:
    fault = FaultRun(ctx, "kills", smtp)
    rng = random.Random(seed)
    # The first host's start is no restart: it creates the groups (and on a fresh broker
    # waits for the group coordinator), which takes seconds more; it is kept apart.
    starts: list[float] = []

    def start() -> HostProcess:
        started = time.monotonic()
        host = fault.host()
        starts.append(time.monotonic() - started)
        return host

    try:
        fault.stream(events=10_000_000, rate=rate, seed=seed)  # until stopped
        host = start()
        for i in range(kills):
            time.sleep(rng.uniform(0.3, 2.0))
            host.kill()
            host = start()  # the last one catches up at the end
            ctx.progress.status(f"kills: {i + 1}/{kills} (ready after {starts[-1]:.1f} s)")
        fault.wait_traffic(stop=True)
        verification = fault.finish()
    finally:
        fault.stop_all()
    restarts = starts[1:]
    return fault.outcome(
        f"SIGKILL of the consumer host ×{kills}",
        verification,
        [Check(f"{kills} kills mid-stream", len(restarts) == kills)],
        {
            "kills": kills,
            "first_start_to_ready_ms": round(starts[0] * 1000, 1),
            "restart_to_ready_ms": summary_ms(restarts),
        },
    )
