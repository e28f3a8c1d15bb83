"""The store's owner: the one process that holds the DuckDB file and serves everyone else.

The consumer host opens the file once. Each of its threads (a consumer group, the
outbox, the monitor) gets its own cursor, so their transactions run side by side
under DuckDB's MVCC — no process-wide lock in front of the connection. Every other
process reaches the same database through DuckDB's Quack protocol on
``127.0.0.1:HORIZONS_STORE_PORT``, authenticated by a random token written to
``var/store.json`` (0600).

A second owner on the same file is a hot standby: DuckDB refuses it the file, so it
waits, and takes over the moment the first owner's process is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import duckdb

from horizons_platform.settings import Settings
from horizons_platform.store import sessions, tables
from horizons_platform.store.base import StoreBase, StoreUnavailable, connect, in_transaction
from horizons_platform.store.endpoint import OwnerInfo, read_owner, remove_owner, write_owner
from horizons_platform.store.extensions import load_extensions
from horizons_platform.store.schema import migrate
from horizons_platform.threads import run_in_background

log = logging.getLogger(__name__)

STANDBY_POLL_S = 0.25
# Owners open in this process, by database file: a client in the owner's own process
# uses the owner's cursors instead of a Quack round trip to itself (which Quack 1.5.5
# also handles badly: a second in-process client can hang while attaching).
_LOCAL_OWNERS: dict[Path, StoreOwner] = {}


def local_owner(path: Path) -> StoreOwner | None:
    return _LOCAL_OWNERS.get(path.resolve())


def lock_holder(exc: BaseException) -> int | None:
    """The pid DuckDB names in a "Could not set lock" error; None for any other error.
    Matched on DuckDB's phrase, not on "lock": a corrupt file's error names a "block",
    and read as a held lock it was retried for 30 s and reported as "held by pid ?"."""
    if "could not set lock" not in str(exc).lower():
        return None
    match = re.search(r"PID (\d+)", str(exc))
    return int(match.group(1)) if match else 0


def process_name(pid: int | None) -> str:
    """``pid 123 (horizons query …)``: which program holds the file, when it can be read."""
    if not pid:
        return "pid ?"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    command = program(argv)
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def program(argv: list[bytes]) -> str:
    """A command line as a person would type it: ``horizons query …`` for
    ``python -m horizons_platform.cli query …`` and ``.venv/bin/horizons query …`` alike,
    ``dagster api grpc …`` for ``/…/.venv/bin/python -m dagster api grpc …``; at most
    60 characters."""
    words = [a.decode(errors="replace") for a in argv if a]
    for i, word in enumerate(words):
        if word.endswith(("horizons", "horizons_platform.cli")):
            words = ["horizons", *words[i + 1 :]]
            break
    else:
        if words and Path(words[0]).name.startswith("python"):
            words = words[2:] if words[1:2] == ["-m"] else words[1:]
        if words:
            words[0] = Path(words[0]).name
    command = " ".join(" ".join(words).split())
    return f"{command[:60]}…" if len(command) > 60 else command


def wal_bytes(database: Path) -> int:
    """The size of DuckDB's write-ahead log for ``database``. While a checkpoint writes
    the WAL into the file, DuckDB 1.5.5 logs new commits to ``.wal.checkpoint``; both
    count until the checkpoint is done."""
    total = 0
    for suffix in (".wal", ".wal.checkpoint"):
        with suppress(OSError):
            total += database.with_name(database.name + suffix).stat().st_size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StoreOwner(StoreBase):
    def __init__(self, settings: Settings, *, serve: bool = True) -> None:
        self.settings = settings
        self.path = Path(settings.database)
        self.serve = serve
        self.info: OwnerInfo | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._wal_seen = 0  # the WAL's size at the last commit (see transaction())
        self._wal_lock = threading.Lock()
        # Told of each DuckDB checkpoint a commit saw: (WAL bytes written, seconds the
        # commit took). The host's Prometheus counters.
        self.observe_checkpoint: Callable[[int, float], None] | None = None
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------

    def open(
        self,
        stop: threading.Event | None = None,
        on_standby: Callable[[str], None] | None = None,
    ) -> bool:
        """Take the file (waiting as a standby while another process holds it), migrate,
        serve Quack. False when ``stop`` was set before the file became free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if local_owner(self.path) is not None:
            # DuckDB would hand this process the file twice; one owner per file, always.
            raise StoreUnavailable(
                f"{self.path} is already owned by a host in this process; run every "
                "service of one store in one host (--service is repeatable)"
            )
        waiting_since: float | None = None
        while True:
            try:
                con = connect(str(self.path))
                break
            except duckdb.IOException as exc:
                holder = lock_holder(exc)
                if holder is None:
                    raise
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    owner = read_owner(self.settings)
                    who = (
                        f"pid {owner.pid} (serving on 127.0.0.1:{owner.port})"
                        if owner
                        else process_name(holder)
                    )
                    message = (
                        f"standby: {self.path} is held by {who}; waiting to take over when it stops"
                    )
                    log.warning(message)
                    if on_standby:
                        on_standby(message)
                if stop is not None and stop.wait(STANDBY_POLL_S):
                    return False
                if stop is None:
                    time.sleep(STANDBY_POLL_S)
        if waiting_since is not None:
            log.warning(
                "took over the store %s after %.1fs as standby",
                self.path,
                time.monotonic() - waiting_since,
            )
        self._con = con
        self._wal_seen = wal_bytes(self.path)
        try:
            threads = self.settings.store_threads or max(1, (os.cpu_count() or 2) - 1)
            con.execute(f"SET threads = {int(threads)}")
            # DuckDB checkpoints on the committing thread once the WAL passes the
            # threshold, rewriting the table's last, partly filled row group each time:
            # at the default 16 MB that is every ~25k audit rows and a third of the
            # auditor's CPU. A larger WAL costs replay time after a crash instead.
            con.execute(f"SET checkpoint_threshold = '{self.settings.store_checkpoint_mb}MB'")
            load_extensions(con)
            migrate(con)
            # Registered before store.json names this process: a client in this process
            # must find the owner's cursors, never a Quack session to itself (whose
            # destructor, run at interpreter exit with the GIL held, waits for this
            # process's own server: a hang CI has seen).
            _LOCAL_OWNERS[self.path.resolve()] = self
            if self.serve:
                self._serve(con)
        except BaseException:
            self.close()
            raise
        return True

    def _serve(self, con: duckdb.DuckDBPyConnection) -> None:
        port = self.settings.store_port or free_port()
        token = secrets.token_urlsafe(24)
        # Clients' statements run on the server's threads, which inherit the nice value
        # of the thread that starts the server. Started from one at background priority
        # (Host._spawn), a client's long query yields the cores to the consumers'
        # commits whenever both want them, and has them all otherwise.
        failed: list[BaseException] = []

        def serve() -> None:
            run_in_background(self.settings.background_nice)
            try:
                con.execute(f"CALL quack_serve('quack:127.0.0.1:{port}', token := '{token}')")
            except BaseException as exc:
                failed.append(exc)

        starter = threading.Thread(target=serve, name="store-serve")
        starter.start()
        starter.join()  # the connection is used by one thread at a time
        if failed and isinstance(failed[0], duckdb.Error):
            raise StoreUnavailable(
                f"cannot serve the store on 127.0.0.1:{port} ({failed[0]}); is another "
                "program using the port? Set HORIZONS_STORE_PORT"
            ) from failed[0]
        if failed:
            raise failed[0]
        self.info = OwnerInfo.new(self.settings, port, token)
        write_owner(self.settings, self.info)
        log.info("serving %s to clients on quack:127.0.0.1:%d", self.path, port)
        self._reaper_stop.clear()
        self._reaper = threading.Thread(
            target=self._end_dead_clients_sessions,
            args=(port,),
            name="store-sessions",
            daemon=True,
        )
        self._reaper.start()

    def _end_dead_clients_sessions(self, port: int) -> None:
        """End the Quack sessions of horizons clients whose process is gone
        (store/sessions.py): until then an open transaction of theirs holds every row
        version DuckDB would clean up, the WAL's checkpoint and the rows it wrote."""
        refused: set[str] = set()  # told once: retried every round, logged once
        while not self._reaper_stop.wait(self.settings.store_reap_interval_s):
            try:
                rows = (
                    self.cursor()
                    .execute("SELECT connection_id, query, state FROM quack_active_connections()")
                    .fetchall()
                )
            except duckdb.Error as exc:
                log.debug("cannot list the store's client sessions: %s", exc)
                continue
            for connection_id, query, state in rows:
                client = sessions.client_of(query)
                if client is None or not sessions.gone(*client):
                    continue
                statement = " ".join(sessions.untagged(query).split())[:80]
                if sessions.disconnect(port, connection_id):
                    log.warning(
                        "ended store session %s of client pid %d, which is gone (%s: %s); "
                        "an open transaction of it is rolled back",
                        connection_id[:8],
                        client[0],
                        state,
                        statement,
                    )
                elif connection_id not in refused and self._still_listed(connection_id):
                    refused.add(connection_id)
                    log.error(
                        "could not end store session %s of client pid %d, which is gone "
                        "(%s: %s); an open transaction of it holds memory, the WAL and "
                        "its rows until it is ended; trying again every %.0fs",
                        connection_id[:8],
                        client[0],
                        state,
                        statement,
                        self.settings.store_reap_interval_s,
                    )

    def _still_listed(self, connection_id: str) -> bool:
        """Whether the server still has the session (its client may have closed it
        between our listing and the disconnect, which then finds nothing to end)."""
        with suppress(duckdb.Error):
            return bool(
                self.cursor()
                .execute(
                    "SELECT count(*) FROM quack_active_connections() WHERE connection_id = ?",
                    [connection_id],
                )
                .fetchall()[0][0]
            )
        return True

    def close(self) -> None:
        if self._con is None:
            return
        if self._reaper is not None:
            self._reaper_stop.set()
            self._reaper.join(timeout=10)
            self._reaper = None
        # store.json goes first, the local registration last (see open()).
        if self.info is not None:
            remove_owner(self.settings)
            with suppress(duckdb.Error):
                self._con.execute(f"CALL quack_stop('{self.info.uri}')")
        if _LOCAL_OWNERS.get(self.path.resolve()) is self:
            del _LOCAL_OWNERS[self.path.resolve()]
        with self._cursors_lock:
            for cur in self._cursors:
                with suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
        with suppress(duckdb.Error):
            self._con.close()
        self._con = None

    # --- access ---------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (created on first use): one per thread, never shared."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            if self._con is None:
                raise StoreUnavailable("the store is not open")
            cur = self._con.cursor()
            with self._cursors_lock:
                self._cursors.append(cur)
            self._local.cursor = cur
        return cur

    def lean_writer(self) -> None:
        """The calling thread's cursor runs without DuckDB's optimizer. A consumer's
        writer thread sends short statements over a few rows (an offsets UPDATE, an
        Arrow INSERT, an upsert by primary key) a dozen times a second per group, and
        DuckDB 1.5.5 spends ~0.5 ms of each statement's ~0.9 ms in the optimizer,
        whatever the rows. Reads that need an index or a pruned scan on such a cursor
        go through :func:`~horizons_platform.store.tables.optimized`."""
        if self.settings.store_lean_writers:
            tables.make_lean(self.cursor())

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        yield self.cursor()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        began = time.monotonic()
        cursor = self.cursor()
        tables.relean(cursor)  # outside any transaction, where DuckDB accepts it
        with in_transaction(cursor) as cur:
            yield cur
        try:
            self._after_commit(time.monotonic() - began)
        except Exception:  # the transaction is committed whatever its report does
            log.exception("could not check the WAL after a commit")

    def _after_commit(self, took: float) -> None:
        """Name DuckDB's checkpoints. One runs inside whichever COMMIT takes the WAL past
        ``checkpoint_threshold``, holding DuckDB's checkpoint lock, which every write
        transaction takes (shared) at its first write: every writer waits until it is
        done (~1.4 s for 256 MB here, every ~2.5 minutes at 1,000 events/s), so an
        operator sees all groups stall at once. DuckDB says nothing of it; the WAL
        shrinking between two commits does, and the first transaction to see that
        reports how long it took, BEGIN to COMMIT: the checkpointing one spent it in its
        COMMIT, any other in its first write, and the first to finish is often not the
        checkpointing one. (One a Quack client's commit triggered is reported by the
        host's next transaction.)"""
        with self._wal_lock:  # stat and update together: the WAL only shrinks in a checkpoint
            size = wal_bytes(self.path)
            written, self._wal_seen = self._wal_seen, size
        if size >= written:
            return
        log.info(
            "DuckDB checkpoint: %.0f MB of WAL written into %s; the transaction that saw it "
            "took %.2fs (every writer waits for a checkpoint; HORIZONS_STORE_CHECKPOINT_MB "
            "sets how often)",
            written / 1e6,
            self.path.name,
            took,
        )
        if self.observe_checkpoint is not None:
            self.observe_checkpoint(written, took)
