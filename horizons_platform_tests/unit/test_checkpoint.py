"""The batch commit without a broker: fencing, one-by-one isolation of a bad record, the
auditor's chain across batches, and a store failure that must not dead-letter anything
(a DuckDB file in tmp_path)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import pytest

from horizons_platform import events as ev
from horizons_platform.kafka.checkpoint import Checkpoint, DeadLetter, is_store_failure
from horizons_platform.kafka.records import Batch, Handler, Tables, Verdicts, now
from horizons_platform.services.audit import AuditHandler, verify_store
from horizons_platform.services.base import rows_to_columns
from horizons_platform.services.metrics import MetricsHandler
from horizons_platform.services.notifications import NotificationHandler
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import is_conflict
from horizons_platform.store.client import Store
from horizons_platform.store.owner import StoreOwner

TOPIC = "job-lifecycle"


class Signals(Handler):
    """A minimal handler: one health_signals row per valid event; a job named 'null'
    yields a row the store refuses (metric NOT NULL), a job named 'bug' raises."""

    group = "unit"

    def topics(self) -> list[str]:
        return [TOPIC]

    def handle(self, batch: Batch) -> Tables:
        rows = []
        for i, e in enumerate(batch.events):
            if e is None:
                continue
            if e["job_id"] == "bug":
                raise RuntimeError("handler bug")
            rows.append(
                {
                    "observed_at": now(),
                    "source": "unit",
                    "consumer_group": "unit",
                    "topic": batch.topics[i],
                    "partition": batch.partitions[i],
                    "metric": None if e["job_id"] == "null" else e["job_id"],
                    "value": float(batch.offsets[i]),
                }
            )
        return {"health_signals": rows_to_columns(rows)} if rows else {}


def _event(job: str) -> bytes:
    event = ev.new_event(
        ev.JobSubmitted,
        producer="unit",
        job_id=job,
        payload={"owner": "unit@observatory.example", "job_type": "imaging"},
    )
    return ev.encode(event)


def _batch(values: list[bytes], first_offset: int = 0, partition: int = 0) -> Batch:
    n = len(values)
    offsets = list(range(first_offset, first_offset + n))
    return Batch.decode([TOPIC] * n, [partition] * n, offsets, [None] * n, list(values), [0] * n)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(Settings(var_dir=tmp_path / "var"))  # type: ignore[call-arg]
    s.ensure_schema()
    return s


def _checkpoint(handler: Handler, store: Store, sent: list[DeadLetter]) -> Checkpoint:
    return Checkpoint(handler, store, send_dead_letters=sent.extend)


def _stored_metrics(store: Store) -> list[str]:
    return [r[0] for r in store.query("SELECT metric FROM health_signals ORDER BY value")[1]]


def test_a_batch_and_its_offsets_are_one_transaction(store: Store) -> None:
    sent: list[DeadLetter] = []
    offsets = _checkpoint(Signals(store.settings), store, sent).commit(
        _batch([_event("a"), b"not json", _event("b")])
    )
    assert offsets == {(TOPIC, 0): 3}
    assert _stored_metrics(store) == ["a", "b"]
    with store.reader() as con:
        assert tables.stored_offsets(con, "unit") == {(TOPIC, 0): 3}
    assert [(d.offset, d.error_class) for d in sent] == [(1, "EventDecodeError.malformed")]
    assert store.query('SELECT "offset", error_class FROM dead_letters')[1] == [
        (1, "EventDecodeError.malformed")
    ]


def test_records_below_the_stored_offsets_are_fenced(store: Store) -> None:
    # Another member already stored offsets 0-4 of this partition.
    store.write(lambda con: tables.save_offsets(con, "unit", {(TOPIC, 0): 5}))
    sent: list[DeadLetter] = []
    batch = _batch([_event(f"j{i}") for i in range(3, 8)], first_offset=3)
    _checkpoint(Signals(store.settings), store, sent).commit(batch)
    assert _stored_metrics(store) == ["j5", "j6", "j7"]
    with store.reader() as con:
        assert tables.stored_offsets(con, "unit") == {(TOPIC, 0): 8}
    # A replay of the same batch is a no-op.
    _checkpoint(Signals(store.settings), store, sent).commit(batch)
    assert _stored_metrics(store) == ["j5", "j6", "j7"]


def test_a_record_the_store_refuses_is_dead_lettered_alone(store: Store) -> None:
    sent: list[DeadLetter] = []
    cp = _checkpoint(Signals(store.settings), store, sent)
    cp.commit(_batch([_event("a"), _event("null"), _event("b")]))
    assert _stored_metrics(store) == ["a", "b"]
    (letter,) = store.query('SELECT "offset", error_class, error_message FROM dead_letters')[1]
    assert letter[0] == 1 and letter[1] == "ConstraintException"
    assert "store rejected rows" in letter[2] and "metric" in letter[2]
    assert cp.counters.take() == {"processed": 3, "errors": 1, "dead_letters": 1}


def test_a_handler_bug_dead_letters_only_its_record(store: Store) -> None:
    sent: list[DeadLetter] = []
    _checkpoint(Signals(store.settings), store, sent).commit(
        _batch([_event("a"), _event("bug"), _event("b")])
    )
    assert _stored_metrics(store) == ["a", "b"]
    assert [(d.offset, d.error_class) for d in sent] == [(1, "RuntimeError")]


def test_a_store_failure_stores_nothing_and_dead_letters_nothing(store: Store) -> None:
    class BrokenStore(Signals):
        def persist(self, con: Any, rows: Tables) -> None:
            raise duckdb.IOException("disk gone")

    sent: list[DeadLetter] = []
    with pytest.raises(duckdb.IOException):
        _checkpoint(BrokenStore(store.settings), store, sent).commit(_batch([_event("a")]))
    assert store.scalar("SELECT count(*) FROM dead_letters") == 0
    assert store.scalar("SELECT count(*) FROM consumer_offsets") == 0


def test_the_auditor_chains_every_record_across_batches(store: Store) -> None:
    sent: list[DeadLetter] = []
    auditor = AuditHandler(store.settings)
    cp = _checkpoint(auditor, store, sent)
    cp.commit(_batch([_event("a"), b'{"event_type": "job.started"}', _event("b")]))
    cp.commit(_batch([_event("c")], first_offset=3))
    # A second auditor (a restarted host) continues the same chain from the store.
    _checkpoint(AuditHandler(store.settings), store, sent).commit(
        _batch([_event("d")], first_offset=4)
    )
    rows = store.query(
        "SELECT seq, job_id, valid, validation_error, payload->>'owner' FROM audit_log ORDER BY seq"
    )[1]
    assert [r[:3] for r in rows] == [
        (1, "a", True),
        (2, None, False),
        (3, "b", True),
        (4, "c", True),
        (5, "d", True),
    ]
    assert "event_id" in rows[1][3] and rows[0][4] == "unit@observatory.example"
    with store.reader() as con:
        report = verify_store(con)
    assert report.ok and report.checked == 5
    assert [d.offset for d in sent] == [1]


def test_the_first_batch_signs_a_head_however_long_the_interval(tmp_path: Path) -> None:
    # The interval counts from the last head; before the first there is none. (It once
    # counted from monotonic zero, the machine's boot: on a machine up for less than
    # the interval, the first head waited — and a CI test with it.)
    settings = Settings(var_dir=tmp_path / "var", audit_head_interval_s=10**9)  # type: ignore[call-arg]
    store = Store(settings)
    store.ensure_schema()
    _checkpoint(AuditHandler(settings), store, []).commit(_batch([_event("a"), _event("b")]))
    assert store.query("SELECT seq FROM audit_heads")[1] == [(2,)]


def test_a_chain_prepared_on_a_stale_tail_is_chained_again(store: Store) -> None:
    sent: list[DeadLetter] = []
    first = _checkpoint(AuditHandler(store.settings), store, sent)
    first.commit(_batch([_event("a"), _event("b")]))
    later = _batch([_event("c")], first_offset=2)
    prepared = first.prepare(later)  # chained after "b", optimistically
    assert prepared is not None and prepared["audit_log"]["seq"] == [3]
    # Meanwhile another writer extends the chain (a takeover, a retried batch …).
    _checkpoint(AuditHandler(store.settings), store, sent).commit(
        _batch([_event("x")], partition=1)
    )
    first.commit(later, prepared)
    rows = store.query("SELECT seq, job_id FROM audit_log ORDER BY seq")[1]
    assert rows == [(1, "a"), (2, "b"), (3, "x"), (4, "c")]
    with store.reader() as con:
        assert verify_store(con).ok


def test_a_republished_event_is_a_no_op_not_a_dead_letter(store: Store) -> None:
    sent: list[DeadLetter] = []
    cp = _checkpoint(MetricsHandler(store.settings), store, sent)
    first, second = _event("a"), _event("b")
    cp.commit(_batch([first]))
    cp.commit(_batch([first, second], first_offset=1))  # "a" published again
    assert store.query("SELECT job_id FROM job_events ORDER BY job_id")[1] == [("a",), ("b",)]
    assert sent == [] and store.scalar("SELECT count(*) FROM dead_letters") == 0
    with store.reader() as con:
        assert tables.stored_offsets(con, "metrics") == {(TOPIC, 0): 3}


def _completed(job: str, event_id: str, owner: str = "unit@observatory.example") -> bytes:
    return ev.encode(
        ev.new_event(
            ev.JobCompleted,
            producer="unit",
            event_id=event_id,
            job_id=job,
            payload={"owner": owner, "job_type": "imaging"},
        )
    )


@pytest.mark.parametrize("handler", [MetricsHandler, NotificationHandler])
def test_an_event_id_reused_for_another_event_is_dead_lettered_not_dropped(
    store: Store, handler: type[Handler]
) -> None:
    used, other = "5d0c9c8e-8f7e-4c1b-9a39-3f4c2b1a0e11", "0b8f6a52-3c6e-4c61-8e0b-7a8f9d2c4e55"
    sent: list[DeadLetter] = []
    cp = _checkpoint(handler(store.settings), store, sent)
    original = _completed("job-a", used)
    cp.commit(_batch([original]))
    # The same event again (a replay) is a no-op; another event under its id, in a later
    # batch or twice in one, is dead-lettered; the batch's other events are stored.
    cp.commit(
        _batch(
            [
                original,
                _completed("job-b", used),
                _completed("job-c", other),
                _completed("job-d", other, owner="someone@else.example"),
            ],
            first_offset=1,
        )
    )
    key = "job_events" if handler is MetricsHandler else "notifications"
    assert store.query(f"SELECT job_id FROM {key} ORDER BY job_id")[1] == [("job-a",), ("job-c",)]
    letters = store.query('SELECT "offset", error_class, error_message FROM dead_letters')[1]
    reused = "EventDecodeError.reused"
    assert [(o, c) for o, c, _ in letters] == [(2, reused), (4, reused)]
    assert all("already used by another event" in m for _, _, m in letters)
    assert sorted(d.offset for d in sent) == [2, 4]
    with store.reader() as con:
        assert tables.stored_offsets(con, handler.group) == {(TOPIC, 0): 5}


def test_verdicts_are_shared_by_message_bytes() -> None:
    verdicts = Verdicts(size=2)
    good, bad = _event("a"), b'{"event_type": "job.started"}'
    first = verdicts.lookup(good)
    assert verdicts.lookup(bytes(bytearray(good))) is first  # equal bytes, another object
    error = verdicts.lookup(bad)
    assert isinstance(error, ev.EventDecodeError) and verdicts.lookup(bad) is error
    for job in ("b", "c", "d"):  # past two generations of two: validated again, same verdict
        verdicts.lookup(_event(job))
    again = verdicts.lookup(good)
    assert again is not first and again == first


def test_one_refused_record_among_many_is_found_in_few_transactions(store: Store) -> None:
    """A batch of garbage with one record the store refuses: halving finds it in ~2·log2(n)
    transactions (one per record stalled two groups for minutes), every other record is
    stored or dead-lettered, and each dead letter is sent once."""
    values = [b"garbage %d" % i if i % 2 else _event(f"j{i}") for i in range(256)]
    values[101] = _event("null")  # refused by the store
    writes = 0
    real_write = store.write

    def counted(work: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal writes
        writes += 1
        return real_write(work, *args, **kwargs)

    store.write = counted  # type: ignore[method-assign]
    sent: list[DeadLetter] = []
    cp = _checkpoint(Signals(store.settings), store, sent)
    assert cp.commit(_batch(values)) == {(TOPIC, 0): 256}
    assert writes <= 3 * 8, writes  # log2(256) = 8 halvings (one by one: 257+)
    assert _stored_metrics(store) == [f"j{i}" for i in range(0, 256, 2)]
    letters = store.query('SELECT "offset" FROM dead_letters ORDER BY 1')[1]
    assert [o for (o,) in letters] == [*range(1, 101, 2), 101, *range(103, 256, 2)]
    assert sorted(d.offset for d in sent) == [o for (o,) in letters]  # each sent once
    assert cp.counters.take() == {"processed": 256, "errors": 1, "dead_letters": 128}


def _optimizer_off(con: duckdb.DuckDBPyConnection) -> bool:
    """Without DuckDB's optimizer, a filter stays above the scan."""
    plan = con.execute("EXPLAIN SELECT 1 FROM jobs WHERE job_id = 'x'").fetchall()[0][1]
    return "FILTER" in plan


@pytest.mark.parametrize("lean", [True, False], ids=["lean-writer", "optimizer-on"])
def test_a_conflict_outlasting_its_retries_stops_the_batch_and_dead_letters_nothing(
    tmp_path: Path, lean: bool
) -> None:
    """Another transaction holding a row the batch updates (a client's write transaction
    left open, its process gone) is no fault of the record: the batch is a store failure —
    retried by the loop, then the consumer stops — never a dead letter. Before, the lean
    writer's optimizer PRAGMA raised "transaction is aborted" over the conflict, and
    without a lean writer the isolation dead-lettered the valid event."""
    settings = Settings(var_dir=tmp_path / "var", store_lean_writers=lean)  # type: ignore[call-arg]
    owner = StoreOwner(settings, serve=False)
    owner.open()
    sent: list[DeadLetter] = []
    try:
        cp = Checkpoint(MetricsHandler(owner.settings), owner, send_dead_letters=sent.extend)
        started = ev.encode(
            ev.new_event(
                ev.JobStarted,
                producer="unit",
                job_id="j1",
                payload={
                    "owner": "unit@observatory.example",
                    "job_type": "imaging",
                    "worker": "w1",
                },
            )
        )
        done = _completed("j1", "0193a5f0-0000-7000-8000-000000000001")
        with ThreadPoolExecutor(1) as writer:  # one thread: the consumer's lean cursor
            writer.submit(owner.lean_writer).result()
            writer.submit(cp.commit, _batch([_event("j1"), started])).result()
            writer.submit(cp.commit, _batch([started], first_offset=2)).result()  # an update
            other = owner.cursor()  # this thread's: the other transaction
            other.execute("BEGIN")
            other.execute("UPDATE jobs SET status = status, updated_at = updated_at")
            batch = _batch([done, b"not json"], first_offset=3)
            for _ in range(3):  # the loop retries the same batch while the conflict lasts
                with pytest.raises(duckdb.TransactionException, match="Conflict") as failed:
                    writer.submit(cp.commit, batch).result()
                assert is_store_failure(failed.value) and is_conflict(failed.value)
            other.execute("ROLLBACK")
            assert owner.scalar("SELECT count(*) FROM dead_letters") == 0
            assert owner.scalar("SELECT status FROM jobs WHERE job_id = 'j1'") == "running"
            # The loop's retry, once the row is free: stored, and the cursor lean again.
            writer.submit(cp.commit, batch).result()
            # The bad record's letter went to the DLQ topic once, not once per attempt.
            assert [d.offset for d in sent] == [4]
            assert owner.scalar("SELECT count(*) FROM dead_letters") == 1
            assert writer.submit(lambda: _optimizer_off(owner.cursor())).result() == lean
        assert owner.scalar("SELECT status FROM jobs WHERE job_id = 'j1'") == "completed"
        with owner.reader() as con:
            assert tables.stored_offsets(con, "metrics") == {(TOPIC, 0): 5}
    finally:
        owner.close()


def test_a_conflict_is_known_by_duckdbs_words_not_by_a_word_anywhere() -> None:
    assert is_conflict(duckdb.TransactionException("TransactionContext Error: Conflict on update!"))
    assert is_conflict(
        duckdb.TransactionException("TransactionContext Error: Conflict on tuple deletion!")
    )
    # The disk refusing the WAL of a store whose path says "conflict" is a store failure
    # to give up on, not a conflict to wait out.
    refused = duckdb.TransactionException(
        'TransactionContext Error: Failed to commit: Cannot open file "/srv/conflict-db/'
        'horizons.duckdb.wal": Is a directory'
    )
    assert not is_conflict(refused) and is_store_failure(refused)
    assert not is_conflict(duckdb.IOException("Conflicting lock is held in /x (PID 1)"))
