"""`horizons bench checkpoint`: how long a DuckDB checkpoint holds every writer, by how
much the store already holds.

A checkpoint takes DuckDB's checkpoint lock exclusively, and every write transaction
takes it shared at its first write: while one runs, no group commits (docs/kpis.md).
DuckDB 1.5.5 also writes each changed table's ART index — every PRIMARY KEY and UNIQUE
constraint is one — at every checkpoint, each node an insert touched: with random keys
nearly all of it (duckdb/duckdb#24848), so the wait grew with the rows stored; with the
time-ordered keys the platform mints (ids.py), only the index's newest edge.

This measures that without a broker: the orchestrator's messages for ``--events`` events
(captured, not produced) go through the four handlers and the loop's Checkpoint into a
store owner on a fresh file with automatic checkpoints off, and one CHECKPOINT of what
they wrote is timed. The hot tables then grow to the next of ``--sizes`` events by
copies of their own rows under fresh keys, and the same stream is timed again.
"""

from __future__ import annotations

import time
from typing import Any

from horizons_bench.harness import BenchContext
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.transactions import batches, stored_every_one
from horizons_bench.workload import Recorder
from horizons_platform.kafka.checkpoint import Checkpoint
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import HANDLERS
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.owner import StoreOwner, wal_bytes

# Issue 8: no group stalls more than 1 s — and every group stalls for a whole checkpoint.
STALL_TARGET = Target("le", 1.0)  # s
# About four messages per simulated job (its lifecycle events and its metrics).
EVENTS_PER_JOB = 4
# Copied with fresh keys to grow the store: the per-event tables, then the per-job ones
# (a quarter of the events' rows); the key expression replaces the key column. The keys
# are time-ordered, as the platform mints them (ids.py): random ones would make every
# checkpoint write the whole of each index.
_GROWN: tuple[tuple[str, str, float], ...] = (
    ("job_events", "uuidv7()::VARCHAR AS event_id", 1.0),
    # Past every seq and offset stored, and past any offset the stream reaches.
    (
        "audit_log",
        "seq + (SELECT max(seq) FROM audit_log) AS seq, "
        '"offset" + (SELECT 1e12 + max("offset") FROM audit_log)::BIGINT AS "offset"',
        1.0,
    ),
    ("notifications", "uuidv7()::VARCHAR AS notification_id", 0.25),
    ("job_metrics", "uuidv7()::VARCHAR AS event_id", 0.25),
    ("jobs", "uuidv7()::VARCHAR AS job_id", 0.25),
)


def run(
    ctx: BenchContext,
    events: int = 50_000,
    sizes: tuple[int, ...] = (0, 1_000_000),
    batch: int = 500,
    seed: int = 7,
) -> BenchResult:
    sizes = tuple(sorted({0, *sizes}))  # a fresh store first: copies need rows to copy
    result = BenchResult(
        "checkpoint", params={"events": events, "sizes": list(sizes), "batch": batch, "seed": seed}
    )
    # Automatic checkpoints off (1 TB of WAL): the run times its own, one per size.
    settings = ctx.settings("checkpoint", store_checkpoint_mb=1_000_000)
    store = StoreOwner(settings, serve=False)
    store.open()
    offsets: dict[str, dict[str, int]] = {}  # group → topic → next offset
    try:
        for n, size in enumerate(sizes):
            stored = _count(store)
            if size > stored:
                ctx.progress.say(f"checkpoint: growing the store to {size:,} events")
                _grow(store, size)
                _checkpoint(store)
                stored = _count(store)
            messages = _messages(settings, events, seed + n, prefix=f"ck{n}")
            ctx.progress.say(f"checkpoint: {len(messages):,} messages through the four groups")
            if not _store_stream(result, settings, store, messages, batch, offsets):
                break
            wal = wal_bytes(store.path)
            took = _checkpoint(store)
            file_mb = store.path.stat().st_size / 2**20
            ctx.progress.say(f"checkpoint: {took:.2f} s with {stored:,} events stored before")
            result.add(
                Figure(
                    f"checkpoint of {events:,} events' rows, {stored:,} stored before",
                    took,
                    "s",
                    STALL_TARGET,
                    note=f"{wal / 2**20:.0f} MB of WAL; file {file_mb:,.0f} MB after",
                )
            )
    finally:
        store.close()
    result.notes.append(
        "every group's transactions wait for a whole checkpoint (DuckDB's checkpoint "
        "lock); DuckDB 1.5.5 writes every ART index node an insert touched, so random "
        "keys make it grow with the store (duckdb/duckdb#24848)"
    )
    result.notes.append(
        "a StoreOwner on a fresh file, no broker; the store grown by copies of its own "
        "rows under fresh keys"
    )
    return result


def _messages(settings: Settings, events: int, seed: int, prefix: str) -> list[tuple[str, bytes]]:
    """The orchestrator's messages for about ``events`` events, kept in memory."""
    capture = Recorder(settings)
    orch = JobOrchestratorService(settings, recover=False, wait=False, publisher=capture)
    jobs = max(1, events // EVENTS_PER_JOB)
    run_simulation(orch, plan(jobs, seed=seed, prefix=prefix), seed=seed)
    return [(m.topic, m.value or b"") for m in capture.messages]


def _store_stream(
    result: BenchResult,
    settings: Settings,
    store: StoreOwner,
    messages: list[tuple[str, bytes]],
    batch: int,
    offsets: dict[str, dict[str, int]],
) -> bool:
    """Every group's batches of ``messages`` through its handler and the loop's
    Checkpoint, offsets going on from the last round's; False (and the run failed) when
    a batch did not end in the group's tables."""
    for group, cls in HANDLERS.items():
        handler = cls(settings)
        topics = set(handler.topics())
        mine = [(t, v) for t, v in messages if t in topics]
        checkpoint = Checkpoint(handler, store, send_dead_letters=lambda _: None)
        for decoded in batches(mine, batch, offsets.setdefault(group, {})):
            checkpoint.commit(decoded, checkpoint.prepare(decoded))
        if not stored_every_one(result, group, checkpoint, len(mine)):
            return False
    return True


def _count(store: StoreOwner) -> int:
    return int(store.scalar("SELECT count(*) FROM job_events"))


def _grow(store: StoreOwner, size: int) -> None:
    """Copy the hot tables' rows under fresh keys until ``job_events`` holds ``size``."""
    while (stored := _count(store)) < size:
        step = min(stored, size - stored)

        def copy(con: Any, step: int = step) -> None:
            for table, key, share in _GROWN:
                con.execute(
                    f"INSERT INTO {table} SELECT * REPLACE ({key}) FROM {table} "
                    f"LIMIT {max(1, int(step * share))}"
                )

        store.write(copy)


def _checkpoint(store: StoreOwner) -> float:
    with store.reader() as con:
        started = time.monotonic()
        con.execute("CHECKPOINT")
        return time.monotonic() - started
