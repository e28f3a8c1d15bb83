"""The owner host killed mid-stream while a hot standby waits.

A second `horizons consume` on the same DuckDB file is a standby: DuckDB refuses it the
file, so it polls for it. Each round kills the owner with SIGKILL; the standby takes the
file (replaying the WAL), migrates, serves Quack, joins the groups under the same static
member ids (so Kafka hands it the dead owner's partitions without waiting out a session),
resumes from the offsets in DuckDB, and becomes the owner; a new standby is started
behind it. Takeover time is kill → the new owner's consumers all have partitions, split
into kill → file taken and file taken → consumers ready. At the end every table must be
exact (nothing lost, nothing doubled) and the audit chain must verify.
"""

from __future__ import annotations

import random
import re
import time
from datetime import datetime

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import summary_ms
from horizons_platform.waiting import wait_until

STANDBY_LINE = "standby:"
TOOK_OVER = re.compile(r"took over the store .* after ([\d.]+)s as standby")


def _standby(fault: FaultRun, n: int) -> HostProcess:
    host = fault.host(wait=False, log_name=f"-{n}")
    wait_until(
        lambda: STANDBY_LINE in host._new_log() or not host.alive,
        60,
        interval=0.05,
        what="the standby to wait for the store",
    )
    return host


def _file_taken_at(host: HostProcess) -> float | None:
    """Wall-clock time the standby got the file, from its log's timestamps."""
    for line in host._new_log().splitlines():
        if TOOK_OVER.search(line):
            stamp = re.match(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d+)", line)
            if stamp:
                return datetime.fromisoformat(stamp.group(1).replace(",", ".")).timestamp()
    return None


def run(
    ctx: BenchContext, smtp: SmtpSink, kills: int = 5, rate: float = 400.0, seed: int = 7
) -> FaultOutcome:
    fault = FaultRun(ctx, "failover", smtp)
    rng = random.Random(seed)
    takeover: list[float] = []
    file_taken: list[float] = []
    try:
        owner = fault.host(log_name="-0")
        standby = _standby(fault, 1)
        fault.stream(events=10_000_000, rate=rate, seed=seed)  # until stopped
        for i in range(kills):
            time.sleep(rng.uniform(1.0, 3.0))  # mid-stream, mid-batch
            killed_wall, killed = time.time(), time.monotonic()
            owner.kill()
            standby.wait_ready(120)
            assert standby.ready_at is not None
            takeover.append(standby.ready_at - killed)
            taken = _file_taken_at(standby)
            if taken is not None:
                file_taken.append(max(0.0, taken - killed_wall))
            ctx.progress.say(
                f"failover: {i + 1}/{kills}: standby ready {takeover[-1]:.2f} s after kill"
            )
            owner, standby = standby, _standby(fault, i + 2)
        fault.wait_traffic(stop=True)
        standby.stop()
        verification = fault.finish()
    finally:
        fault.stop_all()
    return fault.outcome(
        f"SIGKILL of the owner host ×{kills} with a hot standby",
        verification,
        [Check(f"{kills} takeovers by the standby", len(takeover) == kills)],
        {
            "kills": kills,
            "takeover_ms": summary_ms(takeover),
            "file_taken_ms": summary_ms(file_taken),
            "takeovers_s": [round(t, 3) for t in takeover],
        },
    )
