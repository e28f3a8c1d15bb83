"""The broker goes away mid-stream, on a private broker this scenario may stop at will.

Short outages (stop, pause, start; well within HORIZONS_BROKER_GRACE_S): the host must
ride every one out without exiting. Then one long outage with a short grace: the host
must shut down cleanly with exit code 3 (EXIT_BROKER_LOST) within grace + shutdown time;
after the broker is back a new host resumes, and nothing is lost or doubled.
"""

from __future__ import annotations

import shutil
import time

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext, dedicated_broker
from horizons_bench.smtp import SmtpSink
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.kafka.consumer import EXIT_BROKER_LOST

SHORT_GRACE_S = 5.0


def run(
    ctx: BenchContext,
    smtp: SmtpSink,
    restarts: int = 5,
    pause_s: float = 1.0,
    rate: float = 300.0,
    seed: int = 7,
) -> FaultOutcome:
    data = ctx.run_dir / "private-broker"
    with dedicated_broker(ctx.base, data, ctx.progress) as broker:
        outcome = _run(ctx, smtp, broker, restarts, pause_s, rate, seed)
    if not ctx.keep_data:
        shutil.rmtree(data, ignore_errors=True)
    return outcome


def _run(
    ctx: BenchContext,
    smtp: SmtpSink,
    broker: EmbeddedBroker,
    restarts: int,
    pause_s: float,
    rate: float,
    seed: int,
) -> FaultOutcome:
    # The normal grace must cover a stop + start of the JVM broker (~5-10 s here).
    fault = FaultRun(ctx, "broker", smtp, kafka_bootstrap=broker.bootstrap, broker_grace_s=60.0)
    outages: list[float] = []
    checks: list[Check] = []
    try:
        host = fault.host()
        fault.stream(events=10_000_000, rate=rate, seed=seed)
        for i in range(restarts):
            time.sleep(3)
            down = time.monotonic()
            broker.stop()
            time.sleep(pause_s)
            broker.start(progress=lambda _: None)
            outages.append(time.monotonic() - down)
            ctx.progress.status(f"broker: outage {i + 1}/{restarts} ({outages[-1]:.1f} s)")
        time.sleep(3)
        checks.append(
            Check(
                f"host rode out {restarts} outages within the grace period",
                host.alive,
                f"outages {', '.join(f'{o:.1f}' for o in outages)} s",
            )
        )
        # Long outage: a host with a short grace must give up cleanly, then resume.
        host.stop()
        env = {"HORIZONS_BROKER_GRACE_S": str(SHORT_GRACE_S), "HORIZONS_SHUTDOWN_TIMEOUT_S": "5"}
        short = fault.host(env=env)
        short.exit_expected = True  # exit 3 is what this phase is about
        time.sleep(2)
        broker.stop()
        # Timed from the broker's exit, not from the SIGTERM: the JVM's own shutdown took
        # up to its 30 s SIGKILL fallback in some CI runs, which says nothing of the host.
        down = time.monotonic()
        limit = SHORT_GRACE_S + 5 + 30  # grace + shutdown timeout + probe/backoff slack
        code = short.wait(limit + 30)
        exited_after = time.monotonic() - down
        checks.append(
            Check(
                f"past the grace ({SHORT_GRACE_S:.0f} s) the host exits {EXIT_BROKER_LOST}",
                code == EXIT_BROKER_LOST,
                f"exit {code}",
            )
        )
        checks.append(
            Check(
                "…cleanly and promptly",
                code is not None and exited_after < limit,
                f"{exited_after:.1f} s after the broker stopped",
            )
        )
        if code is None:
            short.kill()
        time.sleep(2)
        broker.start(progress=lambda _: None)
        fault.host()  # resumes from DuckDB's offsets
        fault.wait_traffic(stop=True)
        verification = fault.finish()
    finally:
        fault.stop_all()
    return fault.outcome(
        f"broker restarted ×{restarts} + one outage past the grace",
        verification,
        checks,
        {"outages_s": [round(o, 1) for o in outages]},
    )
