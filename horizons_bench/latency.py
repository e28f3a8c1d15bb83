"""`horizons bench latency`: how long an event takes to be stored, and a finished job to
reach its owner's mailbox, at a steady rate.

Two clocks per event, both conservative in a different way:

* produce → committed: the Kafka CreateTime of the message against the moment its
  group's committed offset (sampled every ~20 ms from the broker) passed it. The loop
  commits to Kafka right after the DuckDB transaction, so this is an upper bound on
  produce → durable in DuckDB, by at most the sampling interval.
* produce → stored: the host's own histogram (``horizons_produce_to_stored_seconds``),
  each record's age at the DuckDB commit of its batch, read from /metrics before and
  after the measured window — exact up to its 10 ms buckets around the target.
* produce → row stamp: the same CreateTime against the row's own ``ingested_at`` /
  ``recorded_at``, which the handler stamps *before* the transaction commits: a lower
  bound.

E-mail: CreateTime of the terminal event against the moment the SMTP sink received the
message for that job.

A warm-up at the same rate comes first and is not measured: a freshly started broker
spends about half a core on its JIT compiler for its first minute, and the host its
first seconds on imports and caches — a running platform pays neither. The bench also
prints the cores each process used while measured, since on a small machine they all
share them.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from horizons_bench import hostmetrics
from horizons_bench.cpu import CpuShares, ThreadShares
from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostProcess
from horizons_bench.offsets import TP, OffsetProbe
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import histogram_quantile, summary_ms
from horizons_bench.workload import (
    Ledger,
    LedgerPublisher,
    Sent,
    encode_jobs,
    produce_jobs,
    replay,
)
from horizons_platform import events as ev
from horizons_platform.kafka.broker import listener_pid
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import free_port, wal_bytes
from horizons_platform.waiting import wait_until

EMAIL_TARGET = Target("le", 500)
SAMPLE_INTERVAL_S = 0.02
# At 1,000 events/s with all four, before the store had one owner (docs/kpis.md):
# produce → committed p50 516–534 ms, p99 1,536–1,754 ms per group.
BEFORE_RATE = 1_000.0
BEFORE_P50_MS = 525.0
BEFORE_P99_MS = 1_645.0


def stored_target(rate: float) -> Target | None:
    """Issue 9's bound on produce → stored p99 at ``rate``: 150 ms up to 1,000 events/s,
    500 ms up to 10,000; none named beyond."""
    if rate <= 1_000:
        return Target("le", 150)
    if rate <= 10_000:
        return Target("le", 500)
    return None


class CommitWatcher:
    """Samples every group's committed offsets; remembers when each one moved."""

    def __init__(self, probe: OffsetProbe) -> None:
        self.probe = probe
        # (group, tp) → parallel lists of (committed offset, wall time first seen)
        self.offsets: dict[tuple[str, TP], list[int]] = defaultdict(list)
        self.times: dict[tuple[str, TP], list[float]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watcher", daemon=True)
        self.polls = 0

    def start(self) -> CommitWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            tick = time.monotonic()
            for group in self.probe.groups:
                committed = self.probe.committed(group)
                seen = time.time()  # after the answer: never earlier than the commit
                for tp, offset in committed.items():
                    key = (group, tp)
                    if offset and (not self.offsets[key] or offset > self.offsets[key][-1]):
                        self.offsets[key].append(offset)
                        self.times[key].append(seen)
            self.polls += 1
            self._stop.wait(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - tick)))

    def committed_at(self, group: str, sent: Sent) -> float | None:
        """When ``group``'s committed offset first passed ``sent``'s offset."""
        key = (group, (sent.topic, sent.partition))
        i = bisect.bisect_right(self.offsets[key], sent.offset)
        return self.times[key][i] if i < len(self.times[key]) else None


def _row_latencies(settings: Settings, by_coord: dict[tuple[str, int, int], Sent]) -> dict:
    """produce → row stamp, per table (a lower bound: stamped before the commit)."""
    coords = 'topic, "partition", "offset"'
    queries = {
        "job_events.ingested_at": f"SELECT {coords}, ingested_at FROM job_events",
        "audit_log.recorded_at": f"SELECT {coords}, recorded_at FROM audit_log",
        "notifications.created_at": (
            'SELECT e.topic, e."partition", e."offset", n.created_at FROM notifications n '
            "JOIN job_events e USING (event_id)"
        ),
    }
    out: dict[str, list[float]] = {}
    with Store(settings).reader() as con:
        for name, sql in queries.items():
            values = []
            for topic, part, off, stamp in con.execute(sql).fetchall():
                sent = by_coord.get((topic, part, off))
                if sent is not None:
                    values.append(stamp.timestamp() - sent.ts)
            out[name] = values
    return out


def _email_latencies(ledger: Ledger, smtp: SmtpSink) -> list[float]:
    terminal = {s.key.decode(): s.ts for s in ledger.sent if s.kind in ev.TERMINAL_TYPES and s.key}
    first: dict[str, float] = {}
    for r in smtp.snapshot():
        job_id = r.subject.split(" job ", 1)[-1].rsplit(" ", 1)[0]
        first.setdefault(job_id, r.at)
    return [at - terminal[j] for j, at in first.items() if j in terminal]


def run(
    ctx: BenchContext,
    rate: float = 1000.0,
    seconds: float = 30.0,
    seed: int = 7,
    warmup: float = 20.0,
    producer: str = "replay",
) -> BenchResult:
    params = {
        "rate": rate,
        "seconds": seconds,
        "seed": seed,
        "warmup_s": warmup,
        "producer": producer,
    }
    result = BenchResult("latency", params=params)
    with SmtpSink(own_process=True) as smtp:
        metrics_port = free_port()
        settings = ctx.settings("latency", smtp_port=smtp.port, metrics_port=metrics_port)
        topics = group_topics(settings)
        probe = OffsetProbe(settings, topics)
        host = HostProcess(settings, ctx.run_dir / "host-latency.log").start()
        try:
            ctx.progress.say(f"latency: host pid {host.pid}, ready in {host.wait_ready():.1f} s")
            watcher = CommitWatcher(OffsetProbe(settings, topics)).start()
            send = _sender(settings, rate, producer, int(rate * warmup), seed + 1)
            warm = Ledger()
            if warmup > 0:
                ctx.progress.say(f"latency: warming up at {rate:,.0f} events/s for {warmup:.0f} s")
                send(
                    LedgerPublisher(settings, warm),
                    lambda n, total: ctx.progress.status(f"warm-up: sent {n:,}/{total:,}"),
                )
            ledger = Ledger(track=True)
            publisher = LedgerPublisher(settings, ledger)  # the platform's own producer config
            send = _sender(settings, rate, producer, int(rate * seconds), seed)
            ctx.progress.say(f"latency: producing {rate:,.0f} events/s for {seconds:.0f} s")
            cpu = CpuShares(
                {
                    "consumer host": host.pid,
                    "consumer host's SMTP sender": host.sender_pid(),
                    "broker": _broker_pid(settings),
                    "load generator (this process)": os.getpid(),
                    "SMTP sink": smtp.pid,
                }
            ).start()
            host_threads = ThreadShares(host.pid).start()
            broker_threads = ThreadShares(_broker_pid(settings)).start()
            scraped = hostmetrics.scrape(metrics_port)
            stored_before = hostmetrics.stored_buckets(scraped)
            checkpoints_before = hostmetrics.checkpoints(scraped)
            wal_before = wal_bytes(Path(settings.database))
            started = time.monotonic()
            send(publisher, lambda n, total: ctx.progress.status(f"latency: sent {n:,}/{total:,}"))
            achieved = ledger.total / (time.monotonic() - started)
            cores = cpu.stop()
            by_thread = host_threads.stop()
            broker_by_thread = broker_threads.stop()

            def drained() -> bool:
                states = probe.snapshot()
                return all(s.caught_up for s in states.values()) and (
                    smtp.distinct() >= warm.terminal + ledger.terminal
                )

            wait_until(drained, timeout=300, interval=0.5, what="consumers and e-mails")
            watcher.stop()
            # One scrape for the p99s and the checkpoints: the same window, drain included.
            scraped = hostmetrics.scrape(metrics_port)
            window_s = time.monotonic() - started
            wal_after = wal_bytes(Path(settings.database))
            stored = hostmetrics.between(stored_before, hostmetrics.stored_buckets(scraped))
            checkpoints_after = hostmetrics.checkpoints(scraped)
        finally:
            host.stop()

    by_group: dict[str, list[float]] = {}
    for group in SERVICE_GROUPS:
        values = []
        for sent in ledger.sent:
            if sent.topic in topics[group]:
                at = watcher.committed_at(group, sent)
                if at is not None:
                    values.append(at - sent.ts)
        by_group[group] = values
    by_coord = {(s.topic, s.partition, s.offset): s for s in ledger.sent}
    rows = _row_latencies(settings, by_coord)
    emails = _email_latencies(ledger, smtp)

    result.add(Figure("achieved produce rate", achieved, "events/s", note=f"{ledger.total:,}"))
    stored_ms: dict[str, dict[str, float | None]] = {}
    target = stored_target(rate)
    # The "before" figures were taken at 1,000 events/s: a ratio at another rate means nothing.
    before_p50, before_p99 = (BEFORE_P50_MS, BEFORE_P99_MS) if rate == BEFORE_RATE else (None, None)
    for group in SERVICE_GROUPS:
        buckets = stored.get(group, [])
        p50, p99 = (histogram_quantile(buckets, q) for q in (0.5, 0.99))
        stored_ms[group] = {
            "n": buckets[-1][1] if buckets else 0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        }
        width = hostmetrics.bucket_width_at(buckets, p99) if p99 is not None else 0.0
        result.add(
            Figure(
                f"produce → stored, {group} p99",
                stored_ms[group]["p99_ms"],
                "ms",
                target,
                note=f"host's histogram at the commit, ±{width * 1000:.0f} ms",
            )
        )
        result.add(Figure(f"produce → stored, {group} p50", stored_ms[group]["p50_ms"], "ms"))
    for group, values in by_group.items():
        result.add(_p99(f"produce → committed, {group}", values, target, before_p99))
        p50 = summary_ms(values)["p50_ms"]
        result.add(Figure(f"produce → committed, {group} p50", p50, "ms", before=before_p50))
    for name, values in rows.items():
        result.add(_p99(f"produce → {name} (lower bound)", values, None))
    result.add(_p99("job finished → e-mail received", emails, EMAIL_TARGET))
    for name, used in cores.items():
        what = "machine (every process)" if name == "machine" else name
        note = f"of {os.cpu_count()} cores" if name == "machine" else ""
        result.add(Figure(f"CPU while measured: {what}", used, "cores", note=note))
    if by_thread:
        waits = host_threads.waiting
        top = ", ".join(
            f"{name} {used:.2f}/{waits.get(name, 0.0):.2f}"
            for name, used in list(by_thread.items())[:8]
        )
        result.notes.append(
            f"consumer host by thread (cores on a CPU / cores' worth waiting for one): {top}; "
            f"all its threads waited {sum(waits.values()):.2f} for a CPU"
        )
    if broker_by_thread:
        # A broker started minutes ago still compiles its hot paths (HotSpot's C1/C2
        # threads): cores the platform would have on a broker that has run for a while.
        jit = sum(c for name, c in broker_by_thread.items() if "Compil" in name)
        top = ", ".join(f"{name} {c:.2f}" for name, c in list(broker_by_thread.items())[:5])
        result.notes.append(f"broker by thread (cores): {top}; its JIT compilers {jit:.2f}")
    result.notes.append(
        f"not measured: a {warmup:.0f} s warm-up at the same rate first (JIT, caches)"
        if warmup > 0
        else "no warm-up: a fresh broker's JIT compiler competes for the cores"
    )
    result.notes.append(
        "load: the orchestrator's messages, encoded before the measured window and "
        "replayed at the rate (--producer orchestrator: encoded live, on the same cores)"
        if producer == "replay"
        else "load: the orchestrator encoding and sending live, on the same cores"
    )
    result.notes.append(
        _checkpoint_note(
            settings, checkpoints_before, checkpoints_after, wal_after - wal_before, window_s
        )
    )
    result.notes.append(
        f"committed offsets sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms "
        f"({watcher.polls:,} polls): committed figures are upper bounds by that much"
    )
    result.details = {
        "produced": ledger.summary(),
        "produce_to_stored": stored_ms,
        "produce_to_committed": {g: summary_ms(v) for g, v in by_group.items()},
        "produce_to_row_stamp": {n: summary_ms(v) for n, v in rows.items()},
        "job_to_email": summary_ms(emails),
        "emails_received": len(smtp.snapshot()),
        "emails_expected": ledger.terminal,
        "cpu_cores": {k: round(v, 3) for k, v in cores.items()},
        "host_cpu_cores_by_thread": by_thread,
        "host_cpu_wait_by_thread": host_threads.waiting,
        "broker_cpu_cores_by_thread": broker_by_thread,
    }
    return result


Send = Callable[[LedgerPublisher, Callable[[int, int], None]], int]


def _sender(settings: Settings, rate: float, producer: str, events: int, seed: int) -> Send:
    """How ``events`` events get produced at ``rate``: replayed from messages the
    orchestrator encodes now, before anything is measured, or (``producer="orchestrator"``)
    by the orchestrator live, its CPU shared with the platform (as before 2026-12-07)."""
    if producer == "orchestrator":
        return lambda publisher, progress: produce_jobs(
            settings, events, publisher, rate=rate, seed=seed, progress=progress
        )
    if producer != "replay":
        raise ValueError(f"producer must be 'replay' or 'orchestrator', not {producer!r}")
    messages = encode_jobs(settings, events, seed=seed)
    return lambda publisher, progress: replay(publisher, messages, rate=rate, progress=progress)


def _broker_pid(settings: Settings) -> int | None:
    """The local broker's process (the first bootstrap address's listener), if local."""
    host, _, port = settings.bootstrap.split(",")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return None
    return listener_pid(int(port))


def _p99(
    name: str, seconds: list[float], target: Target | None, before: float | None = None
) -> Figure:
    s: dict[str, Any] = summary_ms(seconds)
    return Figure(
        f"{name} p99",
        s["p99_ms"],
        "ms",
        target,
        note=f"p50 {s['p50_ms']} / p95 {s['p95_ms']} / max {s['max_ms']} ms, n={s['n']:,}",
        before=before,
    )


def _checkpoint_note(
    settings: Settings,
    before: tuple[hostmetrics.Buckets, float, float],
    after: tuple[hostmetrics.Buckets, float, float],
    wal_growth: int,
    window_s: float,
) -> str:
    """Whether a DuckDB checkpoint fell in the window. Each one holds every group's commits
    for the time it takes (~1.4 s for 256 MB here), so a window with one and a window
    without one measure different things: say which this was, and how often one comes."""
    buckets = hostmetrics.window(before[0], after[0])
    count = int(buckets[-1][1]) if buckets else 0
    written = after[2] - before[2]
    per_s = max(0.0, wal_growth + written) / window_s if window_s > 0 else 0.0
    every = settings.store_checkpoint_mb * 1e6 / per_s if per_s > 0 else float("inf")
    pace = (
        f"the WAL grew {per_s / 1e6:.2f} MB/s: one checkpoint every ~{every:.0f} s "
        f"at HORIZONS_STORE_CHECKPOINT_MB={settings.store_checkpoint_mb}"
    )
    if not count:
        return f"no DuckDB checkpoint in the window ({pace}; a longer --seconds includes one)"
    longest = hostmetrics.longest(buckets)
    return (
        f"{count} DuckDB checkpoint(s) in the window, {written / 1e6:.0f} MB of WAL; the "
        f"transactions that saw them took {after[1] - before[1]:.2f} s (the longest ≤ "
        f"{longest} s), and every group's transactions waited for them: the p99s include "
        f"that ({pace})"
    )
