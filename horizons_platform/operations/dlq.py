"""`horizons dlq list|show|replay`: the dead letters in DuckDB, and their way back.

A replay re-publishes a letter's original bytes (or corrected ones, ``--value-file``) to
its original topic with its original key and a ``replayed_from=<topic/partition/offset>``
header. Every consumer keys its rows by event_id, so a replayed event is stored once
however often it arrives; the store also remembers that a letter was replayed, and a
second replay of it is refused unless forced. Each replay is audited.
"""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from horizons_platform.kafka.producer import Publisher
from horizons_platform.runtime.publications import enqueue_audit, publish_now
from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase

_REF = re.compile(r"^(?P<topic>[^/]+)/(?P<partition>\d+)/(?P<offset>\d+)$")
_AGO = re.compile(r"^(?P<n>\d+)(?P<unit>[smhd])$")


class DlqError(ValueError):
    """A selection or reference that cannot be served."""


@dataclass(frozen=True)
class Ref:
    topic: str
    partition: int
    offset: int

    @classmethod
    def parse(cls, text: str) -> Ref:
        m = _REF.match(text.strip())
        if not m:
            raise DlqError(f"a dead letter is named topic/partition/offset, not {text!r}")
        return cls(m["topic"], int(m["partition"]), int(m["offset"]))

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d`` ago, or an ISO 8601 time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    if m := _AGO.match(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m["unit"]]
        return now - timedelta(**{unit: int(m["n"])})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DlqError(f"--since takes 30m, 2h, 7d or an ISO time, not {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass
class Letter:
    ref: Ref
    groups: list[str]
    error_class: str
    error_message: str
    received_at: datetime
    raw: bytes | None
    key: bytes | None
    replayed_at: datetime | None
    replayed_as: str | None


def select(
    store: StoreBase,
    *,
    refs: list[Ref] | None = None,
    group: str | None = None,
    error_class: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[Letter]:
    """Dead letters matching every filter given, one per original message (a bad event
    is dead-lettered by each group that read it)."""
    where, params = ["TRUE"], []
    if refs:
        where.append(
            "("
            + " OR ".join('(topic = ? AND "partition" = ? AND "offset" = ?)' for _ in refs)
            + ")"
        )
        for r in refs:
            params += [r.topic, r.partition, r.offset]
    if group:
        where.append("consumer_group = ?")
        params.append(group)
    if error_class:
        where.append("error_class LIKE ?")
        params.append(error_class.replace("*", "%"))
    if since:
        where.append("received_at >= ?")
        params.append(since)
    sql = f"""
        SELECT topic, "partition", "offset", list(DISTINCT consumer_group ORDER BY consumer_group),
               min(error_class), min(error_message), min(received_at), any_value(raw),
               any_value("key"), max(replayed_at), max(replayed_as)
        FROM dead_letters WHERE {" AND ".join(where)}
        GROUP BY topic, "partition", "offset"
        ORDER BY min(received_at), topic, "partition", "offset"
        {f"LIMIT {int(limit)}" if limit else ""}
    """
    with store.reader() as con:
        rows = con.execute(sql, params).fetchall()
    return [
        Letter(Ref(t, p, o), list(g), ec, em, at, _bytes(raw), _bytes(key), rat, ras)
        for t, p, o, g, ec, em, at, raw, key, rat, ras in rows
    ]


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


@dataclass(frozen=True)
class Replayed:
    ref: Ref
    to: str | None  # topic/partition/offset of the new message; None = skipped
    note: str


def replay(
    settings: Settings,
    store: StoreBase,
    publisher: Publisher,
    letters: list[Letter],
    *,
    value: bytes | None = None,
    force: bool = False,
    actor: str | None = None,
    on_letter: Callable[[int], None] | None = None,
) -> list[Replayed]:
    """Re-publish ``letters`` (``value`` replaces the bytes of a single letter)."""
    if value is not None and len(letters) != 1:
        raise DlqError("--value-file corrects one letter: name exactly one")
    actor = actor or f"{getpass.getuser()}@{socket.gethostname()} (horizons dlq replay)"
    out: list[Replayed] = []
    for letter in letters:
        if on_letter is not None:
            on_letter(len(out))
        if letter.replayed_at is not None and not force:
            out.append(
                Replayed(
                    letter.ref,
                    None,
                    f"already replayed at {letter.replayed_at:%Y-%m-%d %H:%M:%S} as "
                    f"{letter.replayed_as}; nothing sent (--force sends it again)",
                )
            )
            continue
        body = value if value is not None else letter.raw
        if body is None:
            out.append(Replayed(letter.ref, None, "no value (a tombstone): nothing to replay"))
            continue
        # Sent first, marked after: a crash in between re-sends on the next replay, which
        # the consumers' event_id keys make harmless; marking first could lose the letter.
        delivery = publisher.send(
            letter.ref.topic,
            body,
            key=letter.key,
            headers=[("replayed_from", str(letter.ref).encode())],
        )
        to = f"{delivery.topic}/{delivery.partition}/{delivery.offset}"
        details = {
            "replayed_from": str(letter.ref),
            "replayed_as": to,
            "groups": letter.groups,
            "error_class": letter.error_class,
            "corrected": value is not None,
            "forced": letter.replayed_at is not None,
        }
        with store.transaction() as con:
            con.execute(
                "UPDATE dead_letters SET replayed_at = ?, replayed_as = ? "
                'WHERE topic = ? AND "partition" = ? AND "offset" = ?',
                [datetime.now(UTC), to, letter.ref.topic, letter.ref.partition, letter.ref.offset],
            )
            record = enqueue_audit(
                con,
                settings,
                actor,
                "dlq.replay",
                details,
                producer=f"horizons-cli@{socket.gethostname()}",
            )
        publish_now(store, publisher, [record])
        out.append(
            Replayed(letter.ref, to, "corrected bytes" if value is not None else "original bytes")
        )
    return out
