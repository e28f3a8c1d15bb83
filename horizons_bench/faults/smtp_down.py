"""The SMTP server goes away for a while: notifications must be retried and, once it is
back, every one delivered (the outbox keeps them; nothing is dropped)."""

from __future__ import annotations

import time

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext
from horizons_bench.smtp import SmtpSink


def run(
    ctx: BenchContext, smtp: SmtpSink, down_s: float = 10.0, rate: float = 200.0, seed: int = 7
) -> FaultOutcome:
    fault = FaultRun(ctx, "smtp", smtp)
    try:
        host = fault.host()
        fault.stream(events=int(rate * (down_s + 8)), rate=rate, seed=seed)
        time.sleep(3)
        before = smtp.distinct()
        smtp.stop()
        ctx.progress.say(f"smtp: SMTP sink down for {down_s:.0f} s")
        time.sleep(down_s)
        smtp.start()
        alive = host.alive
        verification = fault.finish()
    finally:
        if not smtp.running:
            smtp.start()
        fault.stop_all()
    statuses = verification.notifications_by_status
    return fault.outcome(
        f"SMTP down for {down_s:.0f} s",
        verification,
        [
            Check("host kept running", alive),
            Check("every notification ended 'sent'", set(statuses) <= {"sent"}, str(statuses)),
        ],
        {"emails_before_outage": before},
    )
