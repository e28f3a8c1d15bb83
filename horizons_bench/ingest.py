"""`horizons bench ingest`: end-to-end throughput, produced → committed in DuckDB.

Events are produced first (so producing never competes with consuming), then one
consumer host per configuration — each service alone, then all four together — reads
them from the beginning into a fresh DuckDB file. The rate of a group is taken from its
first commit to its last (start-up and group join excluded; reported separately).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from horizons_bench import references
from horizons_bench.harness import BenchContext, derive
from horizons_bench.hostproc import HostProcess
from horizons_bench.offsets import TP, OffsetProbe
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.runner import Timeline, all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_bench.verify import Verification, verify
from horizons_bench.workload import Ledger, bulk_publisher, produce_jobs
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS, Settings

AUDITOR = "compliance-auditor"
ALONE_TARGET = {AUDITOR: Target("ge", 100_000)}
TOGETHER_TARGET = Target("ge", 20_000)
RATIO_TARGET = Target("ge", 0.2)


@dataclass
class HostRun:
    label: str
    groups: tuple[str, ...]
    ready_s: float
    timeline: Timeline
    exit_code: int
    cpu_s: float | None  # host CPU from ready to caught up
    verification: Verification

    def rate(self, group: str) -> float | None:
        return self.timeline.steady_rate(group)

    def system_rate(self, events: int) -> float | None:
        """Produced events per second until every group had processed all of them."""
        firsts = [self.timeline.first_progress(g) for g in self.groups]
        lasts = [self.timeline.caught_up(g) for g in self.groups]
        if any(s is None for s in firsts + lasts):
            return None
        start = min(s.t for s in firsts if s)
        end = max(s.t for s in lasts if s)
        return events / (end - start) if end > start else None

    def details(self) -> dict[str, Any]:
        rss = [s.rss for s in self.timeline.samples if s.rss]
        return {
            "groups": list(self.groups),
            "ready_s": round(self.ready_s, 2),
            "exit_code": self.exit_code,
            "host_cpu_s": self.cpu_s,
            "peak_rss_mib": round(max(rss) / 2**20, 1) if rss else None,
            "rate": {g: self.rate(g) for g in self.groups},
            "rate_windows": {g: self.timeline.windows(g) for g in self.groups},
            "verification": self.verification.as_dict(),
        }


def run_host_to_end(
    ctx: BenchContext,
    settings: Settings,
    ledger: Ledger,
    groups: tuple[str, ...],
    label: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> HostRun:
    """Run a host over everything already produced, into a fresh DuckDB file; verify it."""
    slug = label.replace(" ", "-")
    run_settings = derive(settings, duckdb_path=ctx.run_dir / f"{ctx.name}-{slug}.duckdb")
    topics = group_topics(run_settings)
    probe = OffsetProbe(run_settings, {g: topics[g] for g in groups})
    for group in groups:
        probe.reset(group)
    only = None if set(groups) == set(SERVICE_GROUPS) else groups
    host = HostProcess(run_settings, ctx.run_dir / f"host-{slug}.log", only, env).start()
    try:
        ctx.progress.say(f"{label}: starting `horizons consume` (pid {host.pid})")
        ready_s = host.wait_ready()
        cpu_ready = host.cpu_seconds() or 0.0  # imports and start-up are not per message
        timeline = watch(
            probe,
            host,
            until=all_caught_up(list(groups)),
            timeout=timeout,
            progress=ctx.progress,
            label=label,
        )
        cpu_end = host.cpu_seconds()
        cpu = cpu_end - cpu_ready if cpu_end is not None else None
        # Taken before stopping: the host announces its own stop on system-health, and
        # those last messages are not meant to be consumed by the stopping host.
        ends = probe.end_offsets()
    finally:
        code = host.stop()
    checked = verify(run_settings, ledger, ends, list(groups))
    rates = ", ".join(f"{g} {timeline.steady_rate(g) or 0:,.0f}/s" for g in groups)
    ctx.progress.say(
        f"{label}: {rates}; " + ("verified" if checked.ok else "; ".join(checked.problems()))
    )
    return HostRun(label, groups, ready_s, timeline, code, cpu, checked)


def produce(ctx: BenchContext, settings: Settings, events: int, seed: int) -> tuple[Ledger, float]:
    ledger = Ledger()
    ctx.progress.say(f"producing {events:,} job events (simulation through the orchestrator)")
    started = time.monotonic()
    produce_jobs(
        settings,
        events,
        bulk_publisher(settings, ledger),
        seed=seed,
        progress=lambda n, total: ctx.progress.status(f"produced {n:,}/{total:,}"),
    )
    seconds = time.monotonic() - started
    ctx.progress.say(f"produced {ledger.total:,} events in {seconds:.1f} s")
    return ledger, seconds


def reference_ends(probe_settings: Settings) -> dict[TP, int]:
    """End offsets of every topic a service reads (the DLQ excluded)."""
    topics = group_topics(probe_settings)
    probe = OffsetProbe(probe_settings, topics)
    return probe.end_offsets()


def run(
    ctx: BenchContext,
    events: int = 100_000,
    services: tuple[str, ...] = SERVICE_GROUPS,
    together: bool = True,
    seed: int = 7,
    timeout: float = 1800.0,
) -> BenchResult:
    result = BenchResult(
        "ingest",
        params={
            "events": events,
            "services": list(services),
            "together": together,
            "seed": seed,
            "batch_max_messages": ctx.base.batch_max_messages,
        },
    )
    with SmtpSink() as smtp:
        settings = ctx.settings("ingest", smtp_port=smtp.port)
        ledger, produce_s = produce(ctx, settings, events, seed)
        runs = [
            run_host_to_end(ctx, settings, ledger, (g,), f"{g} alone", timeout) for g in services
        ]
        if together:
            runs.append(run_host_to_end(ctx, settings, ledger, SERVICE_GROUPS, "all four", timeout))
        ends = reference_ends(settings)
        refs = references.measure(settings, ends, ctx.jar_dir, ctx.run_dir, ctx.progress)

    result.add(
        Figure(
            "pre-produce (orchestrator, acks=all)",
            ledger.total / produce_s,
            "events/s",
            note=f"{ledger.total:,} events",
        )
    )
    for host_run in runs:
        _add_run(result, host_run, refs, ledger.total)
    for ref in (refs.bare, refs.perf):
        if ref is not None:
            bare, perf = refs.ratios(ref.rate)
            result.add(
                Figure(
                    f"reference: {ref.name}", ref.rate, "events/s", None, bare, perf, note=ref.note
                )
            )
    result.details = {
        "produced": ledger.summary(),
        "references": refs.as_dict(),
        "runs": {r.label: r.details() for r in runs},
    }
    return result


# Per service with all four in one host, before the store had one owner (docs/kpis.md:
# 4,276–4,526 events/s, one in-process lock in front of the connection).
BEFORE_ALL_FOUR = 4_400.0


def _add_run(
    result: BenchResult, host_run: HostRun, refs: references.References, produced: int
) -> None:
    together = len(host_run.groups) > 1
    for group in host_run.groups:
        rate = host_run.rate(group)
        bare, perf = refs.ratios(rate)
        target = TOGETHER_TARGET if together else ALONE_TARGET.get(group)
        name = f"{group} {'with all four' if together else 'alone'}"
        note = f"ready in {host_run.ready_s:.1f} s"
        before = BEFORE_ALL_FOUR if together else None
        result.add(Figure(name, rate, "events/s", target, bare, perf, note=note, before=before))
        if group == AUDITOR and not together:
            result.add(Figure("auditor alone ÷ bare loop", bare, "×", RATIO_TARGET))
    if together:
        rate = host_run.system_rate(produced)
        bare, perf = refs.ratios(rate)
        note = "first commit of any group → last group done"
        result.add(
            Figure(
                "all four: job events fully processed",
                rate,
                "events/s",
                None,
                bare,
                perf,
                note=note,
            )
        )
    messages = sum(host_run.timeline.samples[-1].states[g].total for g in host_run.groups)
    if host_run.cpu_s and messages:
        # CPU per message is what the load of other processes cannot distort.
        note = f"{host_run.cpu_s:.1f} CPU-s for {messages:,} messages"
        result.add(
            Figure(
                f"{host_run.label}: host CPU per message",
                host_run.cpu_s / messages * 1e6,
                "µs",
                note=note,
            )
        )
        result.add(
            Figure(
                f"{host_run.label}: messages per CPU-second",
                messages / host_run.cpu_s,
                "msgs/CPU-s",
                note="all groups' messages ÷ host CPU time: what a busy machine cannot skew",
            )
        )
    if not host_run.verification.ok:
        result.notes.append(f"{host_run.label}: " + "; ".join(host_run.verification.problems()))
