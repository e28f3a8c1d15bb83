"""`horizons bench transactions`: what one batch costs each service in DuckDB.

At 1,000 events/s each group commits about ten small batches a second, and a batch's
cost is mostly per statement, not per row (docs/kpis.md). This measures it without a
broker in the way: a simulated stream's messages (the orchestrator's own bytes, captured
instead of produced), cut into batches of ``--batch`` and handed to each service's
handler and the loop's checkpoint against a store owner on a fresh file — the same code
path `horizons consume` runs per batch, minus Kafka. Figures are medians over the second
half of the batches (the tables then hold what an hour of such a stream would).

Before the run the store is given ``--history`` finished jobs and sent notifications
(days of such a stream): a batch must cost what it costs on a fresh file, not grow with
the tables. The outbox's cycle (record the last claim's outcomes, claim the next due) is
timed the same way.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from horizons_bench.harness import BenchContext
from horizons_bench.report import BenchResult, Figure
from horizons_bench.workload import Recorder
from horizons_platform.kafka.checkpoint import Checkpoint
from horizons_platform.kafka.records import Batch
from horizons_platform.runtime.outbox import OutboxDispatcher, Outcome
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import HANDLERS
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.owner import StoreOwner


def run(
    ctx: BenchContext,
    jobs: int = 20_000,
    batch: int = 100,
    seed: int = 7,
    history: int = 2_000_000,
) -> BenchResult:
    result = BenchResult(
        "transactions", params={"jobs": jobs, "batch": batch, "seed": seed, "history": history}
    )
    settings = ctx.settings("transactions")
    # The orchestrator's messages, kept in memory instead of sent: the bench measures
    # the store, and a broker would only add its own noise.
    capture = Recorder(settings)
    orch = JobOrchestratorService(settings, recover=False, wait=False, publisher=capture)
    run_simulation(orch, plan(jobs, seed=seed, prefix="tx"), seed=seed)
    sent = [(m.topic, m.value or b"") for m in capture.messages]
    ctx.progress.say(f"transactions: {len(sent):,} messages from {jobs:,} jobs")
    store = StoreOwner(settings, serve=False)
    store.open()
    try:
        if history:
            store.write(lambda con: _history(con, history, jobs))
            ctx.progress.say(f"transactions: {history:,} finished jobs and sent e-mails stored")

        with ThreadPoolExecutor(1) as writer:
            writer.submit(_time_groups, ctx, result, settings, store, sent, batch).result()
        cycle = _outbox_cycles(settings, store, batch)
        note = f"claim {batch} due + record their outcomes; {history:,} sent before"
        result.add(Figure("outbox: one claim's transaction", cycle, "ms", note=note))
        ctx.progress.say(f"transactions: outbox {cycle:.2f} ms per claim of {batch}")
    finally:
        store.close()
    result.notes.append(
        "median over the second half of the batches; a StoreOwner on a fresh file, no broker"
    )
    return result


def _time_groups(
    ctx: BenchContext,
    result: BenchResult,
    settings: Settings,
    store: StoreOwner,
    sent: list[tuple[str, bytes]],
    batch: int,
) -> None:
    """Each group's batches through its handler and the loop's Checkpoint, timed. Runs
    on a thread of its own, lean like the consumer loop's writer thread."""
    store.lean_writer()
    for group, cls in HANDLERS.items():
        handler = cls(settings)
        topics = set(handler.topics())
        messages = [(t, v) for t, v in sent if t in topics]
        checkpoint = Checkpoint(handler, store, send_dead_letters=lambda _: None)
        prepare_s: list[float] = []
        commit_s: list[float] = []
        for decoded in batches(messages, batch, {}):
            t0 = time.perf_counter()
            rows = checkpoint.prepare(decoded)
            t1 = time.perf_counter()
            checkpoint.commit(decoded, rows)
            t2 = time.perf_counter()
            prepare_s.append(t1 - t0)
            commit_s.append(t2 - t1)
        # A batch that failed or was dead-lettered would time something else.
        stored_every_one(result, group, checkpoint, len(messages))
        half = len(commit_s) // 2
        prep = statistics.median(prepare_s[half:]) * 1000
        commit = statistics.median(commit_s[half:]) * 1000
        note = f"{len(commit_s):,} batches of {batch}; handler's columns {prep:.2f} ms"
        result.add(Figure(f"{group}: one batch's transaction", commit, "ms", note=note))
        ctx.progress.say(f"transactions: {group} {commit:.2f} ms per batch of {batch}")


def batches(
    messages: list[tuple[str, bytes]], size: int, offsets: dict[str, int]
) -> Iterator[Batch]:
    """``messages`` (topic, value) decoded in batches of ``size``, as the loop polls them:
    partition 0, each topic's offsets going on from ``offsets`` (which they update)."""
    for start in range(0, len(messages), size):
        chunk = messages[start : start + size]
        chunk_offsets = []
        for topic, _ in chunk:
            chunk_offsets.append(offsets.get(topic, 0))
            offsets[topic] = chunk_offsets[-1] + 1
        n = len(chunk)
        yield Batch.decode(
            [t for t, _ in chunk], [0] * n, chunk_offsets, [None] * n,
            [v for _, v in chunk], [0] * n,
        )  # fmt: skip


def stored_every_one(
    result: BenchResult, group: str, checkpoint: Checkpoint, expected: int
) -> bool:
    """Whether all ``expected`` messages went through ``group``'s handler into its
    tables; if not, the run failed, and a note says how many did not."""
    counters = checkpoint.counters
    if counters.processed == expected and not counters.errors and not counters.dead_letters:
        return True
    result.passed = False
    result.notes.append(
        f"{group}: {counters.processed:,} of {expected:,} processed, "
        f"{counters.errors} errors, {counters.dead_letters} dead letters"
    )
    return False


def _history(con: Any, rows: int, jobs: int) -> None:
    """``rows`` jobs finished and notifications sent over the days before the run, oldest
    first (the order the groups append them in), their ids spread over the run's own
    like random producer ids: every stored block then spans the ids of a batch, and
    DuckDB cannot skip one by its min/max (ids that sort apart from the run's — the
    history once had 99 % of them so — hid a jobs upsert that read the whole table)."""
    con.execute(
        f"""
        INSERT INTO jobs (job_id, status, owner, job_type, submitted_at, started_at,
            finished_at, duration_s, queue_time_s, last_event_id, updated_at)
        SELECT id, 'completed', 'owner-' || (i % 500) || '@example.org', 'imaging',
            t, t, t, 0, 0, 'hist-event-' || i, t
        FROM (SELECT range AS i,
                     -- among the run's own ids (tx-000000…) in sort order
                     printf('tx-%06d-%d', hash(range) % {max(1, int(jobs))}, range) AS id,
                     now() - INTERVAL 3 DAY + range * INTERVAL 100 MICROSECOND AS t
              FROM range({int(rows)}))
        """
    )
    con.execute(
        f"""
        INSERT INTO notifications (notification_id, event_id, job_id, kind, recipient,
            subject, body, message_id, status, attempts, created_at, sent_at, resends)
        SELECT id, 'hist-event-' || i, 'hist-job-' || i, 'completed',
            'owner-' || (i % 500) || '@example.org', 'Job hist-job-' || i || ' completed',
            repeat('x', 300), '<' || id || '@horizons.local>', 'sent', 1, t, t, 0
        FROM (SELECT range AS i, uuid()::VARCHAR AS id,
                     now() - INTERVAL 3 DAY + range * INTERVAL 100 MICROSECOND AS t
              FROM range({int(rows)}))
        """
    )


def _outbox_cycles(settings: Settings, store: StoreOwner, limit: int) -> float:
    """Median ms of the outbox's transaction over the notifications the run queued: each
    claims ``limit`` and records the previous claim's outcomes (as sent)."""
    dispatcher = OutboxDispatcher(settings, store, threading.Event())
    took: list[float] = []
    claimed = dispatcher._record(limit)
    while claimed:
        dispatcher._outcomes = [Outcome(c.notification_id, c.attempts) for c in claimed]
        t0 = time.perf_counter()
        claimed = dispatcher._record(limit)
        took.append(time.perf_counter() - t0)
    left = store.scalar("SELECT count(*) FROM notification_queue")
    if left:
        raise RuntimeError(f"the outbox left {left} notifications queued")
    return statistics.median(took[len(took) // 2 :]) * 1000 if took else 0.0
