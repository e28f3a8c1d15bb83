"""Clients' sessions on the owner's Quack server: whose each one is, and ending one.

A Quack session lives on the owner until its client says goodbye, and a client that dies
without one (SIGKILL, SIGTERM, a Dagster run killed, the kernel's OOM killer) left it
there for good, its query "active" and its transaction open. DuckDB keeps every row
version an open transaction might still read, so the owner's memory grew (DuckDB's
transaction memory to 0.8 GB in four minutes of the demo's 20 events/s, with four such
sessions), no checkpoint ran and the WAL grew past its
threshold; and a transaction that had written kept its rows from every other writer
(the metrics group's MERGE on ``jobs`` conflicted until the group stopped).

So each statement a horizons client sends names its process (a trailing comment, which
Quack shows as the session's query), and the owner ends the sessions whose process is
gone (StoreOwner's session reaper) with the message a closing client sends: Quack 1.5.5
then rolls the session's transaction back. A user's own DuckDB session names no
process: ``horizons store status`` lists it and ``horizons store disconnect`` ends it.
"""

from __future__ import annotations

import http.client
import os
import re
from contextlib import suppress
from pathlib import Path

_TAG = re.compile(r"\n/\* horizons client (\d+):(\d+):(\d+) \*/$")
_ANY_TAG = re.compile(r"\n?/\* horizons client \d+:\d+:\d+ \*/")
_tags: dict[int, str] = {}


class Unknown(Exception):
    """/proc cannot say whether the process lives (out of file descriptors, hidepid)."""


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc's field 22): with the pid, it
    names one process even after the pid is reused. None when no live process has it
    (a zombie is dead: killed, not yet reaped by its parent); :class:`Unknown` when /proc
    cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (OSError, IndexError, ValueError) as exc:
        raise Unknown(f"/proc/{pid}/stat: {exc}") from exc
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_namespace() -> int | None:
    """This process's PID namespace: a pid names a process only inside its own."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def tagged(sql: str) -> str:
    """``sql`` naming this process, for the owner to find its sessions if it dies. On a
    line of its own at the end, so a caret in an error still points into the user's
    SQL, and a trailing ``--`` comment cannot swallow it."""
    pid = os.getpid()  # a forked child is another process
    tag = _tags.get(pid)
    if tag is None:
        try:
            start, namespace = process_start(pid), pid_namespace()
        except Unknown:
            start = namespace = None
        # Without /proc (not Linux) a process cannot be told from its successor: no tag,
        # and the owner never ends the session.
        known = start and namespace
        tag = _tags[pid] = f"\n/* horizons client {pid}:{start}:{namespace} */" if known else ""
    return sql + tag


def client_of(query: str | None) -> tuple[int, int, int] | None:
    """(pid, start, PID namespace) of the horizons process whose statement ``query`` is,
    if it is one."""
    match = _TAG.search(query or "")
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def untagged(query: str | None) -> str:
    """``query`` as its client wrote it."""
    return _TAG.sub("", query or "")


def untagged_text(message: str) -> str:
    """An error message without the tags it quotes (DuckDB quotes the statement's text,
    e.g. "unterminated quoted string at or near …")."""
    return _ANY_TAG.sub("", message)


def gone(pid: int, start: int, namespace: int) -> bool:
    """The process is certainly no longer running: its pid free, or another process's
    now. False whenever that cannot be told: a client in another PID namespace (its pid
    means nothing here), or /proc unreadable."""
    if namespace != pid_namespace():
        return False
    try:
        return process_start(pid) != start
    except Unknown:
        return False


def disconnect(port: int, connection_id: str, timeout_s: float = 5.0) -> bool:
    """End session ``connection_id`` on the Quack server at 127.0.0.1:``port``, as its own
    client would when closing (DuckDB 1.5.5's disconnect message: a BinarySerializer
    object, field 1 the message type 11, field 2 the connection id, field 3 an
    unset uint64). The server rolls back the session's transaction. A query still
    running finishes first and its result is dropped. True if the server accepted it."""
    if not re.fullmatch(r"[0-9A-F]{32}", connection_id):
        raise ValueError(f"not a Quack connection id: {connection_id!r}")
    body = (
        b"\x01\x00\x0b"
        + b"\x02\x00\x20"
        + connection_id.encode()
        + b"\x03\x00"
        + b"\xff" * 9
        + b"\x01\xff\xff\xff\xff"
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(
            "POST", "/quack", body=body, headers={"Content-Type": "application/octet-stream"}
        )
        response = conn.getresponse()
        answer = response.read()
    except OSError:
        return False
    finally:
        with suppress(OSError):
            conn.close()
    # The server's acknowledgement is message type 10.
    return response.status == 200 and answer.startswith(b"\x01\x00\x0a")
