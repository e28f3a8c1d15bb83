"""The one DuckDB connector every writer and reader goes through.

DuckDB lets one process at a time hold the file (read-only openers are refused too
while a writer holds it). So every caller opens, does a short transaction and closes;
a caller that finds the file locked retries with jittered, capped backoff until an
overall deadline, then fails with a message naming the holder. Kafka is the buffer
while a consumer waits.
"""

from __future__ import annotations

import contextlib
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
# Connections a sticky Store keeps open between transactions, per file (one per process).
_STICKY: dict[Path, duckdb.DuckDBPyConnection] = {}
_COURTESY_UNTIL: dict[Path, float] = {}
WAIT_FRESH_S = 1.0  # a .wait file touched this recently means someone is waiting
COURTESY_S = 0.3  # after yielding, let the waiter in before opening again
_LOCK_PATTERNS = ("Could not set lock", "Conflicting lock", "database is locked")


class StoreLockTimeout(RuntimeError):
    """The DuckDB file stayed locked by another process past the deadline."""


def _is_lock_error(exc: Exception) -> bool:
    return any(p in str(exc) for p in _LOCK_PATTERNS)


def _holder(exc: Exception) -> str:
    match = re.search(r"PID (\d+)", str(exc))
    return f"process {match.group(1)}" if match else "another process"


class Store:
    """Connections to one DuckDB file.

    ``sticky=True`` (the consumer host) keeps its connection open between transactions,
    which saves the ~15–35 ms of opening and checkpointing on every batch, and hands the
    file over as soon as another process asks for it: a process that finds the file
    locked touches ``<file>.wait``; the holder sees it within one poll
    (:meth:`yield_if_wanted`), closes, and waits a moment before opening again.
    """

    def __init__(self, settings: Settings, path: Path | None = None, *, sticky: bool = False):
        self.settings = settings
        self.path = Path(path or settings.database)
        self.sticky = sticky
        self.wait_path = self.path.with_name(self.path.name + ".wait")

    @property
    def _key(self) -> Path:
        return self.path.absolute()

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
                self._ask_for_the_file()
                if time.monotonic() + delay > deadline:
                    raise StoreLockTimeout(
                        f"{self.path} stayed locked by {_holder(exc)} for "
                        f"{self.settings.lock_deadline_s:.0f}s (HORIZONS_LOCK_DEADLINE_S); "
                        "a long-running query or a stuck writer holds it"
                    ) from exc
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.settings.lock_backoff_max_s)

    def _ask_for_the_file(self) -> None:
        # In a read-only directory the holder just yields on its own schedule.
        with contextlib.suppress(OSError):
            self.wait_path.touch()

    def _others_waiting(self) -> bool:
        try:
            return time.time() - self.wait_path.stat().st_mtime < WAIT_FRESH_S
        except OSError:
            return False

    def _acquire(self, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, bool]:
        """(connection, owned): an owned connection is closed after use."""
        held = _STICKY.get(self._key)
        if held is not None:
            return held, False
        pause = _COURTESY_UNTIL.get(self._key, 0.0) - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        if not self.sticky:
            return self._connect(read_only), True
        con = self._connect(read_only=False)
        _STICKY[self._key] = con
        return con, False

    def _done(self, con: duckdb.DuckDBPyConnection, owned: bool) -> None:
        if owned:
            con.close()
        else:
            self.yield_if_wanted()

    def yield_if_wanted(self) -> None:
        """Close a held connection if another process is waiting for the file."""
        if self._key not in _STICKY or not self._others_waiting():
            return
        with _PROCESS_LOCK:
            con = _STICKY.pop(self._key, None)
            if con is not None:
                con.close()
                _COURTESY_UNTIL[self._key] = time.monotonic() + COURTESY_S

    def release(self) -> None:
        """Close a held connection (the host calls this on shutdown)."""
        with _PROCESS_LOCK:
            con = _STICKY.pop(self._key, None)
            if con is not None:
                con.close()

    def ensure_schema(self) -> None:
        from horizons_platform.store.schema import migrate

        if self.path.resolve() in _MIGRATED:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _PROCESS_LOCK:
            con, owned = self._acquire(read_only=False)
            try:
                migrate(con)
            finally:
                if owned:
                    con.close()
            _MIGRATED.add(self.path.resolve())

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside BEGIN … COMMIT, closed afterwards."""
        self.ensure_schema()
        with _PROCESS_LOCK:
            con, owned = self._acquire(read_only=False)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                self._done(con, owned)

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; takes its turn on the file lock like any writer."""
        with _PROCESS_LOCK:
            con, owned = self._acquire(read_only=True)
            try:
                yield con
            finally:
                self._done(con, owned)

    def query(self, sql: str, params: list[object] | None = None) -> tuple[list[str], list[tuple]]:
        with self.reader() as con:
            cur = con.execute(sql, params or [])
            columns = [d[0] for d in cur.description] if cur.description else []
            return columns, cur.fetchall()

    def scalar(self, sql: str, params: list[object] | None = None) -> object:
        _, rows = self.query(sql, params)
        return rows[0][0] if rows else None
