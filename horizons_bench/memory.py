"""`horizons bench memory`: RSS of the consumer host while it works through a large
backlog (default 1,000,000 events), sampled with psutil every half second.

"Events processed" at a sample is the produced count times the progress fraction of the
*slowest* group, so "RSS at 100,000" means every service had processed at least 100,000.
The run stops after ``--max-minutes`` even if the backlog is not drained, and says so.
"""

from __future__ import annotations

from horizons_bench import references
from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.ingest import produce
from horizons_bench.offsets import OffsetProbe
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.runner import Sample, Timeline, all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import growth_pct
from horizons_bench.verify import verify
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS

GROWTH_TARGET = Target("le", 10)
MIB = 2**20
CHECKPOINT = 100_000


def processed(sample: Sample, produced: int) -> int:
    """Events every group has processed (the slowest group's share of the backlog)."""
    fractions = [s.done / s.total for s in sample.states.values() if s.total]
    return int(produced * min(fractions)) if fractions else 0


def rss_level(timeline: Timeline, produced: int, lo: float, hi: float) -> int | None:
    """Median RSS of the samples taken while every service was between ``lo`` and ``hi``
    events. RSS saw-tooths by hundreds of MiB (prefetched batches, DuckDB buffers), so a
    single sample says little about the level."""
    values = sorted(s.rss for s in timeline.samples if s.rss and lo <= processed(s, produced) <= hi)
    return values[len(values) // 2] if values else None


def run(
    ctx: BenchContext,
    events: int = 1_000_000,
    max_minutes: float = 15.0,
    services: tuple[str, ...] = SERVICE_GROUPS,
    seed: int = 7,
) -> BenchResult:
    result = BenchResult(
        "memory",
        params={"events": events, "max_minutes": max_minutes, "services": list(services)},
    )
    with SmtpSink() as smtp:
        settings = ctx.settings("memory", smtp_port=smtp.port)
        ledger, _ = produce(ctx, settings, events, seed)
        topics = group_topics(settings)
        probe = OffsetProbe(settings, {g: topics[g] for g in services})
        only = None if set(services) == set(SERVICE_GROUPS) else services
        host = HostProcess(settings, ctx.run_dir / "host-memory.log", only).start()
        try:
            ctx.progress.say(f"memory: host pid {host.pid}, ready in {host.wait_ready():.1f} s")
            timeline = watch(
                probe,
                host,
                until=all_caught_up(list(services)),
                timeout=max_minutes * 60,
                progress=ctx.progress,
                label="memory",
                interval=0.5,
                raise_on_timeout=False,
            )
            ends = probe.end_offsets()
        finally:
            host.stop()
        refs = references.measure(settings, ends, ctx.jar_dir, ctx.run_dir, ctx.progress)

    produced = ledger.total
    last = timeline.samples[-1]
    finished = all(s.caught_up for s in last.states.values())
    done = processed(last, produced)
    early = rss_level(timeline, produced, CHECKPOINT / 2, CHECKPOINT * 1.5)
    end_rss = rss_level(timeline, produced, done * 0.9, done)
    result.add(Figure("RSS at 100,000 events", mib(early), "MiB", note="median, 50k–150k"))
    note = "end of backlog" if finished else f"stopped after {max_minutes} min"
    result.add(
        Figure(
            f"RSS at {done:,} events", mib(end_rss), "MiB", note=f"median of the last 10 %; {note}"
        )
    )
    result.add(Figure("RSS growth 100k → end", growth_pct(early, end_rss), "%", GROWTH_TARGET))
    peak = max((s.rss for s in timeline.samples if s.rss), default=None)
    result.add(Figure("peak RSS", mib(peak), "MiB"))
    for group in services:
        rate = timeline.steady_rate(group) if finished else _partial_rate(timeline, group)
        bare, perf = refs.ratios(rate)
        result.add(Figure(f"{group} throughput over the run", rate, "events/s", None, bare, perf))
    if not finished:
        result.notes.append(
            f"backlog not drained within {max_minutes} min: {done:,} of {produced:,} events "
            "processed by every service (see details.rate_windows for the trend)"
        )
    checkpoints = {}
    for n in range(CHECKPOINT, produced + 1, CHECKPOINT):
        level = rss_level(timeline, produced, n - CHECKPOINT / 2, n + CHECKPOINT / 2)
        if level is not None:
            checkpoints[n] = round(level / MIB, 1)
    result.details = {
        "produced": ledger.summary(),
        "finished": finished,
        "processed_by_every_service": done,
        "rss_mib_median_around_events": checkpoints,
        "rate_windows": {g: timeline.windows(g, 30.0) for g in services},
        "references": refs.as_dict(),
        "timeline": timeline.compact(5.0),
    }
    if finished:
        checked = verify(settings, ledger, ends, list(services))
        result.details["verification"] = checked.as_dict()
        if not checked.ok:
            result.notes.append("; ".join(checked.problems()))
    return result


def mib(value: int | None) -> float | None:
    return value / MIB if value else None


def _partial_rate(timeline: Timeline, group: str) -> float | None:
    first = timeline.first_progress(group)
    last = timeline.samples[-1]
    if first is None or last.t <= first.t:
        return None
    return (last.states[group].done - first.states[group].done) / (last.t - first.t)
