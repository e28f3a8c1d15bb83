"""The store as every process but its owner sees it: one API, two ways in.

When ``var/store.json`` names a live owner (the consumer host) of this database, a
client talks to it over DuckDB's Quack protocol: each statement runs on the owner
(``quack_query_by_name``), so a long analytical query is one more reader under MVCC and
never stalls ingest. With no owner running, the client opens the DuckDB file itself.

Quack 1.5.5 refuses UPDATE/DELETE/ON CONFLICT through an attached catalog and a
client-side BEGIN does not cover remote statements, so nothing goes through the
catalog: BEGIN, every statement and COMMIT run on the owner, in the client's own
server-side session (one per thread here).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb

from horizons_platform.settings import Settings
from horizons_platform.store import sessions
from horizons_platform.store.base import StoreBase, StoreUnavailable, connect, in_transaction
from horizons_platform.store.endpoint import (
    CATALOG,
    OwnerInfo,
    pid_stopped,
    read_owner,
    stopped_owner,
)
from horizons_platform.store.extensions import load_extensions
from horizons_platform.store.owner import local_owner, lock_holder, process_name, wal_bytes
from horizons_platform.store.sql import inline, literal

log = logging.getLogger(__name__)

REMOTE_QUERY = f"SELECT * FROM quack_query_by_name('{CATALOG}', ?)"
_CLIENTS_QUERY = "SELECT * FROM quack_active_connections()"
INSERT_CHUNK_ROWS = 500
# One file-mode connection at a time per process: DuckDB refuses a read-only and a
# read-write connection to one file side by side in a process. (Only without an owner.)
_FILE_LOCK = threading.RLock()
_MIGRATED: set[Path] = set()
_SESSIONS = threading.local()
# Every open session, whichever thread made it: closed at exit, while the interpreter
# still runs, rather than by a destructor during finalization (which may wait on a
# server whose threads can no longer run).
_OPEN_SESSIONS: weakref.WeakSet[_Session] = weakref.WeakSet()


@atexit.register
def _close_sessions() -> None:
    # Only this process's: a forked child that exits normally must not end the sessions
    # it inherited, which are still its parent's.
    for session in list(_OPEN_SESSIONS):
        if session.pid == os.getpid():
            session.close()


def _disconnected(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, duckdb.IOException) or any(
        s in text for s in ("Invalid connection id", "Authentication failed", "Could not connect")
    )


_WRAPPER_CARET = re.compile(r"\n+LINE 1: " + re.escape(REMOTE_QUERY) + r"\n\s*\^\s*$", re.MULTILINE)


def _unwrapped(exc: duckdb.Error) -> duckdb.Error:
    """The owner's error as the user's statement caused it: Quack 1.5.5 reports every
    remote failure as an Invalid Input Error of the wrapping ``quack_query_by_name`` call,
    with a second caret under that call (the first, under the user's SQL, stays)."""
    text = str(exc)
    cleaned = sessions.untagged_text(_WRAPPER_CARET.sub("", text))
    if cleaned == text:
        return exc
    cleaned = cleaned.removeprefix("Invalid Input Error: ")
    return type(exc)(cleaned)


class _Session:
    """A local in-memory DuckDB with the owner's database attached: one Quack session."""

    def __init__(self, info: OwnerInfo) -> None:
        if info.pid == os.getpid():
            # The owner is this process but not open (starting or stopping): a session
            # to our own server deadlocks when its destructor runs at exit.
            raise StoreUnavailable(
                "the store's owner is this process and it is not open; use it once it is"
            )
        if pid_stopped(info.pid):  # ATTACH would wait on its socket for ever
            raise StoreUnavailable(stopped_owner(info))
        self.info = info
        self.pid = os.getpid()
        self.con = connect()
        _OPEN_SESSIONS.add(self)
        try:
            load_extensions(self.con)
            self.con.execute(
                f"CREATE SECRET horizons_store (TYPE quack, TOKEN {literal(info.token)})"
            )
            self.con.execute(f"ATTACH {literal(info.uri)} AS {CATALOG}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with suppress(duckdb.Error):
            self.con.close()


def _session(info: OwnerInfo, fresh: bool = False) -> _Session:
    """This thread's session with ``info``'s owner (created on first use)."""
    cache: dict[tuple[int, int, str], _Session] = _SESSIONS.__dict__.setdefault("by_owner", {})
    key = (os.getpid(), info.port, info.token)  # a forked child must not reuse a parent's
    session = cache.get(key)
    if session is not None and fresh:
        session.close()
        session = None
    if session is None:
        session = cache[key] = _Session(info)
    return session


def _drop_session(info: OwnerInfo) -> None:
    cache: dict[tuple[int, int, str], _Session] = _SESSIONS.__dict__.get("by_owner", {})
    session = cache.pop((os.getpid(), info.port, info.token), None)
    if session is not None:
        session.close()


class RemoteCursor:
    """A cursor whose statements run on the owner; reads like a DuckDB connection."""

    def __init__(self, store: Store, info: OwnerInfo) -> None:
        self._store = store
        self._info = info
        self._session = _session(info)
        self.in_transaction = False

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> RemoteCursor:
        text = inline(sql, list(params) if params else None)
        word = text.lstrip().split(None, 1)[0].upper() if text.strip() else ""
        try:
            self._execute(text, word)
        except duckdb.Error as exc:
            if self.in_transaction or not _disconnected(exc):
                raise
            # The owner went away (a standby may be taking over): find the live owner
            # and run the statement once more. Not inside a transaction: its work is gone.
            log.info("store owner pid %d unreachable (%s); reconnecting", self._info.pid, exc)
            _drop_session(self._info)
            self._info = self._store.wait_for_owner()
            self._session = _session(self._info)
            self._execute(text, word)
        return self

    def _execute(self, text: str, word: str) -> None:
        if pid_stopped(self._info.pid):
            raise StoreUnavailable(stopped_owner(self._info))
        try:
            # Named after this process, so the owner can end the session if it dies.
            self._session.con.execute(REMOTE_QUERY, [sessions.tagged(text)])
        except duckdb.Error as exc:
            raise _unwrapped(exc) from exc
        # The owner keeps this session's transaction between calls; track it so a lost
        # connection inside one is never silently retried.
        if word in ("BEGIN", "START"):
            self.in_transaction = True
        elif word in ("COMMIT", "ROLLBACK", "ABORT", "END"):
            self.in_transaction = False

    @property
    def description(self) -> Any:
        return self._session.con.description

    def fetchone(self) -> tuple | None:
        return self._session.con.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._session.con.fetchall()

    def fetchmany(self, size: int = 1) -> list[tuple]:
        return self._session.con.fetchmany(size)

    def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], on_conflict: str
    ) -> None:
        """Rows written on the owner as literal VALUES (clients write few rows: reports,
        alerts, checkpoints), in chunks so no statement grows without bound."""
        cols = ", ".join(f'"{c}"' for c in columns)
        for start in range(0, len(rows), INSERT_CHUNK_ROWS):
            chunk = rows[start : start + INSERT_CHUNK_ROWS]
            values = ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in chunk)
            self.execute(f"INSERT INTO {table} ({cols}) VALUES {values}{on_conflict}")


class Store(StoreBase):
    """The client API: Quack to a live owner, the file directly otherwise."""

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.settings = settings
        self.path = Path(path or settings.database)

    # --- which way in ---------------------------------------------------------------------

    def owner(self) -> OwnerInfo | None:
        return read_owner(self.settings)

    def wait_for_owner(self) -> OwnerInfo:
        """A live owner, waiting up to HORIZONS_STORE_CONNECT_TIMEOUT_S for one to serve."""
        deadline = time.monotonic() + self.settings.store_connect_timeout_s
        while (info := self.owner()) is None:
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the store's owner went away and no standby took over within "
                    f"{self.settings.store_connect_timeout_s:.0f}s; start `horizons consume`"
                )
            time.sleep(0.1)
        return info

    def _open_file(self, read_only: bool) -> duckdb.DuckDBPyConnection | None:
        """The file itself, or None as soon as an owner serves it."""
        deadline = time.monotonic() + self.settings.store_connect_timeout_s
        delay = 0.02
        while True:
            if self.owner() is not None:
                return None
            if read_only and not self.path.exists():
                raise FileNotFoundError(
                    f"no DuckDB file at {self.path}: start the consumers "
                    "(`horizons consume`) or set HORIZONS_DUCKDB_PATH"
                )
            try:
                return connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                holder = lock_holder(exc)
                if holder is None:
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"{self.path} is held by {process_name(holder)}, which does not "
                        f"serve it (no live owner in {self.settings.store_file}); waited "
                        f"{self.settings.store_connect_timeout_s:.0f}s "
                        "(HORIZONS_STORE_CONNECT_TIMEOUT_S)"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def _file(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection | None]:
        with _FILE_LOCK:
            con = self._open_file(read_only)
            try:
                yield con
            finally:
                if con is not None:
                    con.close()

    # --- the API ----------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        from horizons_platform.store.schema import migrate

        if (
            self.path.resolve() in _MIGRATED
            or local_owner(self.path) is not None
            or self.owner() is not None
        ):
            return  # the owner migrates when it opens the file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._file(read_only=False) as con:
            if con is not None:
                migrate(con)
                _MIGRATED.add(self.path.resolve())

    @contextmanager
    def _way_in(self, read_only: bool) -> Iterator[Any]:
        """The owner's own cursor (in its process), a Quack cursor, or the file."""
        if (local := local_owner(self.path)) is not None:
            with local.reader() as con:
                yield con
            return
        info = self.owner()
        if info is None:
            with self._file(read_only) as con:
                if con is not None:
                    yield con
                    return
            info = self.wait_for_owner()  # an owner appeared while we waited for the file
        yield RemoteCursor(self, info)

    def reader(self) -> AbstractContextManager[Any]:
        return self._way_in(read_only=True)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        # Through Quack, BEGIN, each statement and COMMIT run on the owner, in this
        # thread's session.
        self.ensure_schema()
        with self._way_in(read_only=False) as con, in_transaction(con):
            yield con

    def disconnect(self, connection: str) -> str:
        """End the owner's client session whose id is or starts with ``connection`` (at
        least 8 characters, as `horizons store status` shows them); its full id."""
        info = self.owner()
        if info is None:
            raise StoreUnavailable("no owner serves the store: there are no sessions to end")
        wanted = connection.strip().upper()
        if len(wanted) < 8:
            raise LookupError(
                f"give at least 8 characters of the connection id, not {connection!r}"
            )
        with self.reader() as con:
            found = con.execute("SELECT connection_id FROM quack_active_connections()")
            ids = [r[0] for r in found.fetchall()]
        matches = [i for i in ids if i.startswith(wanted)]
        if len(matches) != 1:
            raise LookupError(
                f"no session {connection!r} on the owner (pid {info.pid})"
                if not matches
                else f"{connection!r} names {len(matches)} sessions; give more of the id"
            )
        if not sessions.disconnect(info.port, matches[0]):
            raise StoreUnavailable(f"the owner (pid {info.pid}) did not end session {matches[0]}")
        return matches[0]

    def status(self) -> dict[str, Any]:
        """Owner, Quack port, connected clients and file size, for `horizons store status`."""
        info = self.owner()
        wal_size = wal_bytes(self.path)
        size = wal_size + (self.path.stat().st_size if self.path.exists() else 0)
        status: dict[str, Any] = {
            "database": str(self.path),
            "file_size": f"{size / 2**20:,.1f} MiB" if self.path.exists() else "(no file yet)",
            "wal": f"{wal_size / 2**20:,.1f} MiB" if self.path.exists() else "(no file yet)",
            "owner_pid": info.pid if info else None,
            "serving": f"{info.uri} (token in {self.settings.store_file})" if info else None,
            "started_at": info.started_at if info else None,
            "clients": [],
        }
        if info is not None and pid_stopped(info.pid):
            status["problem"] = stopped_owner(info)
        elif info is not None:
            with self.reader() as con:
                # Every writer's commit waits while DuckDB checkpoints (docs/decisions.md):
                # how near the next one is, by the owner's own threshold.
                threshold = con.execute(
                    "SELECT current_setting('checkpoint_threshold')"
                ).fetchall()[0][0]
                status["wal"] += (
                    f"; DuckDB checkpoints it into the file at {threshold} "
                    "(HORIZONS_STORE_CHECKPOINT_MB), every writer waiting meanwhile"
                )
                result = con.execute(_CLIENTS_QUERY)
                columns = [d[0] for d in result.description]
                for row in result.fetchall():
                    client = dict(zip(columns, row, strict=True))
                    query = sessions.untagged(client["query"])
                    if query == _CLIENTS_QUERY:  # this very question
                        continue
                    who = sessions.client_of(client["query"])
                    if who is None:
                        named = "(not horizons)"
                    elif sessions.gone(*who):
                        named = f"pid {who[0]} (gone)"
                    else:
                        named = process_name(who[0])
                    status["clients"].append(
                        {
                            "connection_id": client["connection_id"],
                            "client": named,
                            "state": client["state"],
                            "query_started_at": client["query_started_at"],
                            "query": query,
                        }
                    )
        return status
