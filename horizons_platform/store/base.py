"""What every side of the store offers: short transactions, reads, and their errors.

:class:`~horizons_platform.store.owner.StoreOwner` (the consumer host, which holds the
DuckDB file) and :class:`~horizons_platform.store.client.Store` (everyone else, over
Quack or the file) both implement it, so services and Dagster code take either.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from horizons_platform.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
CONFLICT_RETRIES = 8
SLOW_TRANSACTION_S = 0.5  # logged: the groups' commits should take milliseconds
DYNAMIC_FILTER_KEYS = 10_000  # see connect()


def connect(database: str = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Every DuckDB connection of the platform: nothing is ever downloaded (quack and
    httpfs load from their wheels, store/extensions.py), and timestamps read the same —
    in UTC — whichever process runs the query and whatever its TZ (a day bucket from a
    client that opened the file itself must equal the one the owner serves)."""
    con = duckdb.connect(
        database,
        read_only=read_only,
        config={
            "autoinstall_known_extensions": False,
            # A join of a batch's keys with a big table (the jobs upsert) reads only the
            # keys' rows (through the primary key's index) when DuckDB pushes the keys
            # into the table's scan, which it does for at most this many keys. With
            # DuckDB's 50, a batch of more than 50 jobs read every stored job id: 144
            # against 16 ms a batch of 500 messages beside 2,000,000 jobs (kpis.md). A
            # batch holds up to batch_max_messages (5,000) keys.
            "dynamic_or_filter_threshold": DYNAMIC_FILTER_KEYS,
        },
    )
    con.execute("SET GLOBAL TimeZone = 'UTC'")
    return con


class StoreUnavailable(RuntimeError):
    """Neither a live owner nor the DuckDB file could be reached in time."""


# Failures of the store itself (I/O, memory, a lost connection, a database DuckDB
# invalidated), never of one statement or record.
STORE_ERRORS = (
    duckdb.IOException,
    duckdb.OutOfMemoryException,
    duckdb.ConnectionException,
    duckdb.FatalException,
    duckdb.InternalException,
    StoreUnavailable,
)


# How DuckDB 1.5.5 words a write-write conflict (transaction/duck_transaction.cpp,
# storage/table/*): matched exactly, not as a word anywhere in the message, which also
# holds file paths and, in an invalidated database, the original error.
_CONFLICT = re.compile(
    r"TransactionContext Error: (Conflict on (update|tuple deletion)!|.*write-write conflict)",
    re.IGNORECASE,
)


def is_conflict(exc: BaseException) -> bool:
    """A write-write conflict between two concurrent transactions (MVCC): retry it.
    (Not every TransactionException is one: "Failed to commit: Could not write file" is
    the disk refusing the WAL — a store failure.)"""
    return isinstance(exc, duckdb.TransactionException) and bool(_CONFLICT.match(str(exc)))


class StoreBase(ABC):
    settings: Settings
    path: Path
    # Told how long each write transaction took (the host's Prometheus histogram).
    observe: Callable[[float, str], None] | None = None

    @abstractmethod
    def reader(self) -> AbstractContextManager[Any]:
        """A cursor for reads; each statement sees a consistent snapshot."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A cursor inside BEGIN … COMMIT (ROLLBACK when the block raises)."""

    def ensure_schema(self) -> None:  # noqa: B027 — the owner migrates; clients may not
        """Create or migrate the tables if this side may (a no-op otherwise)."""

    def lean_writer(self) -> None:  # noqa: B027 — only the owner's cursors can be lean
        """Make the calling thread's cursor a lean writer: statements skip DuckDB's
        optimizer (see StoreOwner.lean_writer). A no-op for a client."""

    def write(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in a transaction; retry it when a concurrent writer
        conflicted on the same rows (the other side committed first)."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                started = time.monotonic()
                with self.transaction() as con:
                    result = work(con)
                took = time.monotonic() - started
                if self.observe is not None:
                    self.observe(took, threading.current_thread().name)
                if took > SLOW_TRANSACTION_S:
                    log.warning(
                        "slow store transaction: %.2fs (%s)", took, threading.current_thread().name
                    )
                return result
            except duckdb.Error as exc:
                if attempt == CONFLICT_RETRIES or not is_conflict(exc):
                    raise
                log.info("write conflict, retrying (attempt %d): %s", attempt + 1, exc)
                time.sleep(min(0.5, 0.005 * 2**attempt) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A read-only transaction: every statement sees the same snapshot of the store,
        writes are refused, and writers carry on beside it (MVCC)."""
        with self.reader() as con, in_transaction(con, "BEGIN TRANSACTION READ ONLY"):
            yield con

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        with self.reader() as con:
            cur = con.execute(sql, params or [])
            columns = [d[0] for d in cur.description] if cur.description else []
            return columns, cur.fetchall()

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        _, rows = self.query(sql, params)
        return rows[0][0] if rows else None


@contextmanager
def in_transaction(con: Any, begin: str = "BEGIN TRANSACTION") -> Iterator[Any]:
    """``begin`` … COMMIT on ``con``; ROLLBACK when the block raises or COMMIT fails (a
    conflict found at commit leaves the transaction aborted, and a Quack session would
    stay aborted for every later statement)."""
    con.execute(begin)
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        with suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
