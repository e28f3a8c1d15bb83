"""What a service is to the consumer loop: a handler from a batch of records to columns.

The contract between the one consumer loop (kafka/consumer.py, kafka/checkpoint.py) and
the four services: a :class:`Batch` of polled records, decoded once, column by column,
and the :class:`Handler` that turns it into columns per table — or raises, and the loop
hands it the records one at a time to find the one it cannot handle, and dead-letters
that one. The loop does all the I/O; a handler is pure. The loop owns this contract, so
it never imports a service (docs/decisions.md, "Imports run one way").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from horizons_platform.events import EventDecodeError, EventDict, validate
from horizons_platform.store import tables

if TYPE_CHECKING:
    import duckdb

    from horizons_platform.settings import Settings
    from horizons_platform.store.base import StoreBase

# Columns per table: {table: {column: values}}, every column of a table equally long.
Columns = dict[str, list[Any]]
Tables = dict[str, Columns]


class Verdicts:
    """Validation verdicts by message bytes, shared by the groups of one host.

    Up to four groups read every job-lifecycle message, and validating one is the
    largest share of its cost; a verdict depends on the bytes alone, so the first group
    to meet a message validates it for the others. Two generations of at most ``size``
    entries (swapping a dict needs no lock): groups within ``size`` messages of each
    other share, one further behind validates again. Handlers must not change the dicts.

    Catching up on a backlog, the groups drift tens of thousands of messages apart (the
    health group reads a quarter less); at 4,000 entries they all validated again and
    validation held 45 % of the GIL with four groups (py-spy --gil). A verdict and the
    message bytes it is keyed by take ~1 KB (more for large payloads), so the two
    generations of 16,384 hold ~35 MB; 32,768 measured no faster.
    """

    def __init__(self, size: int = 16_384) -> None:
        self.size = size
        self._new: dict[bytes, EventDict | EventDecodeError] = {}
        self._old: dict[bytes, EventDict | EventDecodeError] = {}

    def lookup(self, value: bytes | None) -> EventDict | EventDecodeError:
        if value is None:
            return _verdict(value)
        verdict = self._new.get(value)
        if verdict is None:
            verdict = self._old.get(value)
            if verdict is None:
                verdict = _verdict(value)
            new = self._new
            if len(new) >= self.size:
                self._old, self._new = new, {}
            self._new[value] = verdict
        return verdict


def _verdict(value: bytes | None) -> EventDict | EventDecodeError:
    try:
        return validate(value)
    except EventDecodeError as exc:
        return exc


VERDICTS = Verdicts()


@dataclass(slots=True)
class Batch:
    """Polled messages as columns, each decoded once: ``events[i]`` is the validated event
    (a dict) of message ``i``, or None with ``errors[i]`` saying why it is invalid."""

    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    timestamps: list[int]
    events: list[EventDict | None] = field(default_factory=list)
    errors: dict[int, EventDecodeError] = field(default_factory=dict)
    # The Kafka cluster the records come from: topic/partition/offset name a message
    # only within one cluster (rows keyed by them carry it).
    cluster_id: str = ""
    _spans: dict[tuple[str, int], tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def decode(
        cls,
        topics: list[str],
        partitions: list[int],
        offsets: list[int],
        keys: list[bytes | None],
        values: list[bytes | None],
        timestamps: list[int],
    ) -> Batch:
        events: list[EventDict | None] = []
        errors: dict[int, EventDecodeError] = {}
        append = events.append
        lookup = VERDICTS.lookup
        for i, value in enumerate(values):
            verdict = lookup(value)
            if isinstance(verdict, EventDecodeError):
                append(None)
                errors[i] = verdict
            else:
                append(verdict)
        return cls(topics, partitions, offsets, keys, values, timestamps, events, errors)

    def take(self, indices: list[int]) -> Batch:
        """The sub-batch of messages ``indices`` (in that order)."""
        return Batch(
            [self.topics[i] for i in indices],
            [self.partitions[i] for i in indices],
            [self.offsets[i] for i in indices],
            [self.keys[i] for i in indices],
            [self.values[i] for i in indices],
            [self.timestamps[i] for i in indices],
            [self.events[i] for i in indices],
            {n: self.errors[i] for n, i in enumerate(indices) if i in self.errors},
            self.cluster_id,
        )

    def spans(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(first, last) offset of every partition in the batch (computed once)."""
        if self._spans is not None:
            return self._spans
        firsts: dict[tuple[str, int], int] = {}
        lasts: dict[tuple[str, int], int] = {}
        for tp, offset in zip(
            zip(self.topics, self.partitions, strict=True), self.offsets, strict=True
        ):
            if tp not in firsts:
                firsts[tp] = offset
            lasts[tp] = offset
        self._spans = {tp: (first, lasts[tp]) for tp, first in firsts.items()}
        return self._spans

    def next_offsets(self) -> dict[tuple[str, int], int]:
        return {tp: last + 1 for tp, (_, last) in self.spans().items()}

    def where(self, event_types: set[str] | frozenset[str]) -> list[int]:
        """Indices of the valid events whose type is in ``event_types``."""
        return [
            i for i, e in enumerate(self.events) if e is not None and e["event_type"] in event_types
        ]


class Handler:
    """Base class of the four services. Subclasses set ``group`` and override ``handle``."""

    group: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Set by the host: hands over the ids of publications (runtime/publications.py)
        # a committed batch enqueued, to be sent to Kafka now rather than by the
        # dispatcher's sweep of older rows.
        self.publish_soon: Callable[[list[str]], None] | None = None

    def topics(self) -> list[str]:
        raise NotImplementedError

    def handle(self, batch: Batch) -> Tables:
        """Columns per table for a batch (valid and invalid events alike: ``batch.errors``
        are dead-lettered by the loop regardless). Raising makes the loop retry the
        records one at a time and dead-letter those that still raise."""
        raise NotImplementedError

    def prepare(self, rows: Tables) -> None:
        """Optional work on ``rows`` before the transaction, on the polling thread while
        the previous batch is still being written (e.g. extending the audit chain
        optimistically); :meth:`persist` must still be right if it was skipped."""

    def persist(self, con: duckdb.DuckDBPyConnection, rows: Tables, *, dedupe: bool = True) -> None:
        """Write the batch's columns inside the loop's transaction. Without ``dedupe`` a
        row whose key is already stored raises (the loop then writes again with it)."""
        for table, columns in rows.items():
            if table == "jobs":
                tables.upsert_jobs(con, columns)
            else:
                tables.insert_columns(con, table, columns, dedupe=dedupe)

    def reused_ids(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> dict[int, str]:
        """Records whose event id came before with other content — earlier in ``batch``
        or (in a handler's override) in its own tables — by index, with the reason: not
        replays, which are no-ops, but another event under a used id, which the loop
        dead-letters. Asked only when a write met a key already there."""
        return reused_in_batch(batch)

    def rollback(self) -> None:
        """The transaction that :meth:`persist` ran in was rolled back (forget its state)."""

    def after_commit(self, rows: Tables) -> None:
        """Called after the batch is durable (e.g. to wake a dispatcher)."""

    def on_stop(self, store: StoreBase) -> None:
        """The loop stops (cleanly): a last write of the handler's own, if it has one."""


# What makes an event the same event again: a replay repeats these; a producer reusing an
# id for something else changes one (the envelope's own bookkeeping may differ).
IDENTITY = ("event_type", "job_id", "occurred_at", "payload")


def reused_in_batch(batch: Batch) -> dict[int, str]:
    """Records of ``batch`` carrying an event id seen earlier in it with other content."""
    first: dict[str, int] = {}
    out: dict[int, str] = {}
    for i, event in enumerate(batch.events):
        if event is None:
            continue
        j = first.setdefault(event["event_id"], i)
        earlier = batch.events[j]
        if j != i and earlier is not None and any(event[k] != earlier[k] for k in IDENTITY):
            out[i] = reused_reason(
                event["event_id"], f"{batch.topics[j]}[{batch.partitions[j]}]@{batch.offsets[j]}"
            )
    return out


def reused_reason(event_id: str, where: str) -> str:
    return (
        f"event_id {event_id} is already used by another event ({where}): an id names one "
        "event, so this is not a replay; publish it with an id of its own"
    )


def now() -> datetime:
    return datetime.now(UTC)
