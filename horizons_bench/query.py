"""`horizons bench query`: what a long analytical query does to ingest.

A steady stream into all four services while `horizons query` runs a ~15 s analytical
query, as an analyst would. Commits are watched from Kafka (each group commits its
offsets right after its DuckDB transaction), so measuring never touches the store.
Before the store had one owner, the same query froze ingest: the auditor committed 56
events in 16 s instead of ~4,800 (docs/kpis.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from itertools import pairwise

from horizons_bench.harness import BenchContext, settings_env
from horizons_bench.hostproc import HostProcess
from horizons_bench.latency import CommitWatcher
from horizons_bench.offsets import OffsetProbe
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.smtp import SmtpSink
from horizons_bench.workload import Ledger, LedgerPublisher, produce_jobs
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS
from horizons_platform.waiting import wait_until

GAP_TARGET = Target("le", 1000)  # ms: no group stalls > 1 s during any client query
WARMUP_S = 5.0
# ~15 s on 2 idle cores with DuckDB 1.5.5; runs on the owner, beside the consumers.
QUERY = "SELECT count(DISTINCT i % 50000021) AS distinct_values FROM range({rows}) t(i)"
# Before the store had an owner (docs/kpis.md, issue 8): the auditor's share of a 16 s
# query at ~300 events/s was 56 of ~4,800 events.
BEFORE_STORED_SHARE = 56 / 4800


def _gaps(times: list[float], start: float, end: float) -> float:
    """The longest time in [start, end] without a commit."""
    inside = [t for t in times if start <= t <= end]
    return max(b - a for a, b in pairwise([start, *inside, end]))


def run(
    ctx: BenchContext, rate: float = 1000.0, rows: int = 60_000_000, seed: int = 7
) -> BenchResult:
    result = BenchResult("query", params={"rate": rate, "rows": rows, "seed": seed})
    with SmtpSink() as smtp:
        settings = ctx.settings("query", smtp_port=smtp.port)
        topics = group_topics(settings)
        host = HostProcess(settings, ctx.run_dir / "host-query.log").start()
        try:
            ctx.progress.say(f"query: host pid {host.pid}, ready in {host.wait_ready():.1f} s")
            watcher = CommitWatcher(OffsetProbe(settings, topics)).start()
            ledger = Ledger()
            publisher = LedgerPublisher(settings, ledger)
            stop = threading.Event()
            producer = threading.Thread(
                target=produce_jobs,
                args=(settings, 10**9, publisher),
                kwargs={"rate": rate, "seed": seed, "stop": stop},
                daemon=True,
            )
            producer.start()
            time.sleep(WARMUP_S)  # steady state before the query (a duration, not a sync)
            ctx.progress.say(f"query: `horizons query` over range({rows:,}) at {rate:,.0f} ev/s")
            started = time.monotonic()
            t0 = time.time()
            query = subprocess.run(
                [sys.executable, "-m", "horizons_platform.cli", "query", QUERY.format(rows=rows)],
                env={**os.environ, **settings_env(settings)},
                capture_output=True,
                text=True,
                timeout=600,
            )
            elapsed = time.monotonic() - started
            t1 = t0 + elapsed
            time.sleep(WARMUP_S)
            stop.set()
            producer.join(60)
            probe = OffsetProbe(settings, topics)
            wait_until(
                lambda: all(s.caught_up for s in probe.snapshot().values()),
                timeout=300,
                interval=0.5,
                what="consumers caught up",
            )
            watcher.stop()
        finally:
            host.stop()
    if query.returncode != 0:
        raise RuntimeError(f"the query failed: {query.stderr.strip()}")

    result.add(Figure("query duration", elapsed, "s", note="horizons query, through the owner"))
    result.add(Figure("produce rate", ledger.total / (elapsed + 2 * WARMUP_S), "events/s"))
    details = {}
    for group in SERVICE_GROUPS:
        # A group commits when any of its partitions' committed offsets moves.
        moves = sorted(t for (g, _), times in watcher.times.items() if g == group for t in times)
        if not moves:
            continue
        worst = _gaps(moves, t0, t1)
        during = sum(1 for t in moves if t0 <= t <= t1)
        has_input = group != "system-health"  # its topic carries a few events a minute
        result.add(
            Figure(
                f"longest commit gap during the query, {group}",
                worst * 1000,
                "ms",
                GAP_TARGET if has_input else None,
                note=f"{during} commits during the query"
                + ("" if has_input else "; low-volume topic, no target"),
            )
        )
        details[group] = {"commits_during_query": during, "longest_gap_s": round(worst, 3)}
    stored = _stored_between(watcher, "compliance-auditor", t0, t1)
    expected = rate * elapsed  # every event produced lands on a topic the auditor reads
    share = stored / expected if expected else None
    result.add(
        Figure(
            "auditor events committed during the query / produced",
            share,
            "ratio",
            note=(
                f"{stored:,} events; before the owner: {BEFORE_STORED_SHARE:.3f} "
                f"(→ {share / BEFORE_STORED_SHARE:.0f}× that)"
                if share
                else ""
            ),
        )
    )
    result.notes.append(
        "commit times are Kafka committed offsets sampled every 20 ms: gaps are upper "
        "bounds by that much"
    )
    result.details = {"groups": details, "query_stdout": query.stdout[-500:]}
    return result


def _stored_between(watcher: CommitWatcher, group: str, t0: float, t1: float) -> int:
    """Messages ``group`` committed between t0 and t1, over all its partitions."""
    total = 0
    for (g, _), offsets in watcher.offsets.items():
        if g != group:
            continue
        times = watcher.times[(g, _)]
        before = [o for o, t in zip(offsets, times, strict=True) if t <= t0]
        upto = [o for o, t in zip(offsets, times, strict=True) if t <= t1]
        total += (upto[-1] if upto else 0) - (before[-1] if before else 0)
    return total
