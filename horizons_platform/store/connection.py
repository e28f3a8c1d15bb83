"""The one DuckDB connector every writer and reader goes through.

DuckDB lets one process at a time hold the file (read-only openers are refused too
while a writer holds it). So every caller opens, does a short transaction and closes;
a caller that finds the file locked retries with jittered, capped backoff until an
overall deadline, then fails with a message naming the holder. Kafka is the buffer
while a consumer waits.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from horizons_platform.settings import Settings

# Threads of one process share DuckDB's in-process database instance; serialising them
# here keeps "one open connection per process" true and the file lock short.
_PROCESS_LOCK = threading.RLock()
_MIGRATED: set[Path] = set()
_LOCK_PATTERNS = ("Could not set lock", "Conflicting lock", "database is locked")


class StoreLockTimeout(RuntimeError):
    """The DuckDB file stayed locked by another process past the deadline."""


def _is_lock_error(exc: Exception) -> bool:
    return any(p in str(exc) for p in _LOCK_PATTERNS)


def _holder(exc: Exception) -> str:
    match = re.search(r"PID (\d+)", str(exc))
    return f"process {match.group(1)}" if match else "another process"


class Store:
    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.settings = settings
        self.path = Path(path or settings.database)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.settings.lock_deadline_s
        delay = self.settings.lock_backoff_initial_s
        while True:
            try:
                if read_only and not self.path.exists():
                    raise FileNotFoundError(
                        f"no DuckDB file at {self.path}: start the consumers "
                        "(`horizons consume`) or set HORIZONS_DUCKDB_PATH"
                    )
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreLockTimeout(
                        f"{self.path} stayed locked by {_holder(exc)} for "
                        f"{self.settings.lock_deadline_s:.0f}s (HORIZONS_LOCK_DEADLINE_S); "
                        "a long-running query or a stuck writer holds it"
                    ) from exc
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.settings.lock_backoff_max_s)

    def ensure_schema(self) -> None:
        from horizons_platform.store.schema import migrate

        if self.path.resolve() in _MIGRATED:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _PROCESS_LOCK:
            con = self._connect(read_only=False)
            try:
                migrate(con)
            finally:
                con.close()
            _MIGRATED.add(self.path.resolve())

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside BEGIN … COMMIT, closed afterwards."""
        self.ensure_schema()
        with _PROCESS_LOCK:
            con = self._connect(read_only=False)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                con.close()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; takes its turn on the file lock like any writer."""
        with _PROCESS_LOCK:
            con = self._connect(read_only=True)
            try:
                yield con
            finally:
                con.close()

    def query(self, sql: str, params: list[object] | None = None) -> tuple[list[str], list[tuple]]:
        with self.reader() as con:
            cur = con.execute(sql, params or [])
            columns = [d[0] for d in cur.description] if cur.description else []
            return columns, cur.fetchall()

    def scalar(self, sql: str, params: list[object] | None = None) -> object:
        _, rows = self.query(sql, params)
        return rows[0][0] if rows else None
