"""`horizons bench soak`: the contract's scenario 13 (events with bounded memory) stretched
over minutes at the simulation's own pace (200 events/s, `horizons simulate`'s default).

Memory is judged after a one-minute warm-up (imports, caches and DuckDB's buffers
settle first): RSS growth from minute 1 to the end, and the slope over the rest.
At the end the store is checked against what was produced: nothing lost or doubled.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.memory import mib
from horizons_bench.offsets import OffsetProbe
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.runner import Sample, all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import growth_pct
from horizons_bench.verify import verify
from horizons_bench.workload import Ledger, LedgerPublisher, produce_jobs
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS

GROWTH_TARGET = Target("le", 10)
WARMUP_S = 60.0


def _median(values: list[int | None]) -> int | None:
    present = sorted(v for v in values if v)
    return present[len(present) // 2] if present else None


def wal_path(database: Path) -> Path:
    return database.with_name(database.name + ".wal")


def slope_mib_per_min(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS over time (MiB per minute)."""
    points = [(s.t / 60, s.rss / 2**20) for s in samples if s.rss]
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def run(ctx: BenchContext, minutes: float = 5.0, rate: float = 200.0, seed: int = 7) -> BenchResult:
    result = BenchResult("soak", params={"minutes": minutes, "rate": rate, "seed": seed})
    events = int(minutes * 60 * rate)
    with SmtpSink() as smtp:
        settings = ctx.settings("soak", smtp_port=smtp.port)
        probe = OffsetProbe(settings, group_topics(settings))
        host = HostProcess(settings, ctx.run_dir / "host-soak.log").start()
        ledger = Ledger()
        try:
            ctx.progress.say(f"soak: host pid {host.pid}, ready in {host.wait_ready():.1f} s")
            producer = threading.Thread(
                target=produce_jobs,
                args=(settings, events, LedgerPublisher(settings, ledger)),
                kwargs={"rate": rate, "seed": seed},
                daemon=True,
            )
            producer.start()
            groups = list(SERVICE_GROUPS)
            caught_up = all_caught_up(groups)
            timeline = watch(
                probe,
                host,
                until=lambda s: not producer.is_alive() and caught_up(s),
                timeout=minutes * 60 + 600,
                progress=ctx.progress,
                label="soak",
                interval=1.0,
            )
            ends = probe.end_offsets()
            # Let the outbox finish the last e-mails before judging them.
            deadline = time.monotonic() + 60
            while smtp.distinct() < ledger.terminal and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            host.stop()

    warm = [s for s in timeline.samples if s.t >= WARMUP_S and s.rss]
    # Levels, not single samples: RSS saw-tooths with every batch and DuckDB checkpoint.
    start_rss = _median([s.rss for s in warm if s.t < 2 * WARMUP_S])
    end_rss = _median([s.rss for s in warm if s.t >= warm[-1].t - WARMUP_S]) if warm else None
    result.add(Figure("events produced", ledger.total, "events", note=f"at {rate:,.0f}/s"))
    result.add(Figure("RSS after 1 min", mib(start_rss), "MiB", note="median of minute 2"))
    result.add(Figure("RSS at the end", mib(end_rss), "MiB", note="median of the last minute"))
    result.add(Figure("RSS growth 1 min → end", growth_pct(start_rss, end_rss), "%", GROWTH_TARGET))
    result.add(Figure("RSS slope after warm-up", slope_mib_per_min(warm), "MiB/min"))
    for group in SERVICE_GROUPS:
        peak = max((s.states[group].lag for s in timeline.samples), default=0)
        result.add(Figure(f"{group} max lag", peak, "messages"))
    checked = verify(
        settings, ledger, ends, list(SERVICE_GROUPS), emails=(smtp.distinct(), len(smtp.snapshot()))
    )
    size = sum(
        p.stat().st_size for p in (settings.database, wal_path(settings.database)) if p.exists()
    )
    result.add(
        Figure(
            "DuckDB file after the run",
            mib(size),
            "MiB",
            note=f"{size / max(1, ledger.total):,.0f} bytes per event, all tables",
        )
    )
    result.add(Figure("lost", checked.lost, "events", Target("eq", 0)))
    result.add(Figure("doubled", checked.doubled, "events", Target("eq", 0)))
    if not checked.ok:
        result.notes.append("; ".join(checked.problems()))
    result.details = {
        "produced": ledger.summary(),
        "verification": checked.as_dict(),
        "timeline": timeline.compact(5.0),
    }
    return result
