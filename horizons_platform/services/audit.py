"""ComplianceAuditor: an immutable, hash-chained record of every event seen.

Every message is stored with its original bytes. Each ``audit_log`` row's hash chains
it to the previous one, so editing, deleting or reordering any row breaks the chain
from that row on. Two hash rules exist (``hash_rule``); old rows keep verifying under
theirs:

1. (until migration 3) SHA-256(prev_hash ‖ canonical JSON of the row's fields).
2. SHA-256(prev_hash ‖ seq ‖ topic/partition/offset ‖ recorded_at ‖ valid ‖ the row's
   identifying columns ‖ SHA-256(raw bytes)): about a microsecond, no JSON at all. The
   identifying columns (event_id, job_id, event_type, occurred_at, validation_error)
   are in it so that a query by job_id cannot be fooled by an edited column; the
   ``payload`` column is DuckDB's projection of ``raw`` and is checked against it.

Retention removes old rows and writes a checkpoint naming the removed seq ranges, so
the rest still verifies.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import sha256 as _sha256
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from horizons_platform import events as ev
from horizons_platform.events import safe_text
from horizons_platform.kafka.records import Batch, Columns, Handler, Tables, now
from horizons_platform.services.signing import HEAD_ACTION, HEAD_KEY, sign_head
from horizons_platform.store import tables
from horizons_platform.store.schema import PAYLOAD_OF_RAW
from horizons_platform.tracing import trace_id_of

if TYPE_CHECKING:
    import duckdb
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from horizons_platform.store.base import StoreBase

GENESIS = "0" * 64
RULE_CANONICAL_JSON = 1
RULE_RAW_BYTES = 2
AUDIT_COLUMNS = (
    "seq",
    "hash_rule",
    "topic",
    "partition",
    "offset",
    "recorded_at",
    "valid",
    "event_id",
    "job_id",
    "event_type",
    "occurred_at",
    "validation_error",
    "payload",
    "raw",
    "prev_hash",
    "hash",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _micros(ts: datetime | None) -> int | None:
    return None if ts is None else (ts - _EPOCH) // _MICROSECOND


def _row_micros(row: dict[str, Any], name: str) -> int | None:
    """A stored row's timestamp as microseconds. DuckDB hands back an instant a Python
    datetime cannot hold as text: then its own reading (``<name>_us``, iter_rows) is
    used."""
    value = row.get(name)
    if value is None or isinstance(value, datetime):
        return _micros(value)
    return int(row[f"{name}_us"])


def _canonical_payload(payload: Any) -> Any:
    if payload is None:
        return None
    value = json.loads(payload) if isinstance(payload, str | bytes) else payload
    return value


def canonical(row: dict[str, Any]) -> bytes:
    """Rule 1: the bytes the hash covers; stable across DuckDB round trips."""
    raw = row.get("raw")
    content = {
        "seq": row["seq"],
        "event_id": row.get("event_id"),
        "job_id": row.get("job_id"),
        "event_type": row.get("event_type"),
        "occurred_at": _iso(row.get("occurred_at")),
        "payload": _canonical_payload(row.get("payload")),
        "raw_sha256": hashlib.sha256(raw).hexdigest() if raw is not None else None,
        "valid": bool(row.get("valid", True)),
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str).encode()


def _link(
    prev_hash: str,
    seq: int,
    topic: str,
    partition: int,
    offset: int,
    recorded_us: int | None,
    valid: bool,
    event_id: str | None,
    job_id: str | None,
    event_type: str | None,
    occurred_us: int | None,
    validation_error: str | None,
    raw: bytes | None,
) -> str:
    """Rule 2's hash of one row. Text fields are length-prefixed (no choice of job_id
    can shift bytes into the next field), a missing value is ``-``. Written out in one
    expression: this runs per message on the auditor's polling thread, where helper
    calls per field cost as much as the two SHA-256 calls."""
    head = (
        f"{prev_hash}|{seq}|{topic}/{partition}/{offset}|"
        f"{'-' if recorded_us is None else recorded_us}|{valid:d}|"
        f"{'-' if event_id is None else f'{len(event_id)}:{event_id}'}|"
        f"{'-' if job_id is None else f'{len(job_id)}:{job_id}'}|"
        f"{'-' if event_type is None else f'{len(event_type)}:{event_type}'}|"
        f"{'-' if occurred_us is None else occurred_us}|"
        f"{'-' if validation_error is None else f'{len(validation_error)}:{validation_error}'}|"
    )
    try:
        data = head.encode()
    except UnicodeEncodeError:  # a lone surrogate from JSON: still hashable, not storable
        data = head.encode("utf-8", "surrogatepass")
    return _sha256(data + _sha256(raw or b"").digest()).hexdigest()


def link(prev_hash: str, row: dict[str, Any]) -> str:
    """The hash ``row`` must carry after ``prev_hash``, under the row's own rule."""
    if row.get("hash_rule", RULE_CANONICAL_JSON) == RULE_CANONICAL_JSON:
        return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()
    return _link(
        prev_hash,
        row["seq"],
        row["topic"],
        row["partition"],
        row["offset"],
        _row_micros(row, "recorded_at"),
        bool(row["valid"]),
        row.get("event_id"),
        row.get("job_id"),
        row.get("event_type"),
        _row_micros(row, "occurred_at"),
        row.get("validation_error"),
        row.get("raw"),
    )


def chain(rows: list[dict[str, Any]], last_seq: int, last_hash: str | None) -> None:
    """Assign seq, prev_hash and hash to new rows in place, continuing the chain."""
    prev = last_hash or GENESIS
    for i, row in enumerate(rows, start=1):
        row["seq"] = last_seq + i
        row["prev_hash"] = prev
        row["hash"] = prev = link(prev, row)


def chain_columns(columns: Columns, last_seq: int, last_hash: str | None) -> tuple[int, str]:
    """Rule 2 over a batch of columns: adds seq, prev_hash and hash; returns the new tail.
    The timestamps become microseconds once here (``recorded_us``/``occurred_us``),
    which the insert reuses instead of converting the datetimes to Arrow again."""
    n = len(columns["offset"])
    seqs = list(range(last_seq + 1, last_seq + n + 1))
    prevs: list[str] = []
    hashes: list[str] = []
    prev = last_hash or GENESIS
    recorded = columns["recorded_us"] = _micros_column(columns["recorded_at"], one_value=True)
    occurred = columns["occurred_us"] = _micros_column(columns["occurred_at"])
    for values in zip(
        seqs,
        columns["topic"],
        columns["partition"],
        columns["offset"],
        recorded,
        columns["valid"],
        columns["event_id"],
        columns["job_id"],
        columns["event_type"],
        occurred,
        columns["validation_error"],
        columns["raw"],
        strict=True,
    ):
        prevs.append(prev)
        prev = _link(prev, *values)
        hashes.append(prev)
    columns["seq"], columns["prev_hash"], columns["hash"] = seqs, prevs, hashes
    columns["hash_rule"] = [RULE_RAW_BYTES] * n
    return (seqs[-1], prev) if n else (last_seq, last_hash or GENESIS)


def _micros_column(values: list[datetime | None], one_value: bool = False) -> list[int | None]:
    """Microseconds since the epoch (a batch's one ``recorded_at`` is converted once)."""
    if one_value and values and values.count(values[0]) == len(values):
        return [_micros(values[0])] * len(values)
    return [None if ts is None else (ts - _EPOCH) // _MICROSECOND for ts in values]


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    through: tuple[int, str] | None = field(default=None, compare=False)  # last row verified


def removed_seqs(checkpoints: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi, _ in removed_ranges(checkpoints)]


def removed_ranges(checkpoints: Iterable[dict[str, Any]]) -> list[tuple[int, int, str | None]]:
    """(first, last, hash of last) of every removed range; the hash is None in
    checkpoints written before ranges carried it."""
    ranges: list[tuple[int, int, str | None]] = []
    for cp in checkpoints:
        raw = cp.get("removed_ranges")
        for entry in json.loads(raw) if isinstance(raw, str) else raw or []:
            lo, hi = int(entry[0]), int(entry[1])
            ranges.append((lo, hi, str(entry[2]) if len(entry) > 2 else None))
    return sorted(ranges)


def _covered(lo: int, hi: int, ranges: list[tuple[int, int]]) -> bool:
    """Is every seq in [lo, hi] inside a removed range?"""
    want = lo
    for a, b in ranges:
        if a <= want <= b:
            want = b + 1
        if want > hi:
            return True
    return want > hi


def verify(
    rows: Iterable[dict[str, Any]],
    checkpoints: Iterable[dict[str, Any]] = (),
    start: tuple[int, str] = (0, GENESIS),
) -> ChainReport:
    """Recompute the chain over rows in seq order, from ``start`` (the (seq, hash) of a
    row verified before, or the genesis); name the first row that breaks it.

    A gap in seq is legitimate only where a retention checkpoint recorded removing
    exactly those seqs; the row after it must then chain to the removed range's last
    hash, as the checkpoint recorded it.
    """
    ranges = removed_ranges(checkpoints)
    spans = [(lo, hi) for lo, hi, _ in ranges]
    last_hash = {hi: digest for _, hi, digest in ranges if digest}
    prev_seq, prev_hash = start
    checked = 0
    for row in rows:
        seq = int(row["seq"])
        if seq != prev_seq + 1:
            if not _covered(prev_seq + 1, seq - 1, spans):
                return ChainReport(False, checked, seq, f"seq {prev_seq + 1}..{seq - 1} missing")
            expected = last_hash.get(seq - 1)
            if expected is not None and row["prev_hash"] != expected:
                return ChainReport(
                    False,
                    checked,
                    seq,
                    f"prev_hash does not match the hash of seq {seq - 1}, which the retention "
                    "checkpoint that removed it recorded",
                )
        elif row["prev_hash"] != prev_hash:
            return ChainReport(False, checked, seq, "prev_hash does not match the previous row")
        if link(row["prev_hash"], row) != row["hash"]:
            return ChainReport(False, checked, seq, "content does not match its hash")
        prev_seq, prev_hash = seq, row["hash"]
        checked += 1
    return ChainReport(True, checked, through=(prev_seq, prev_hash))


def audit_columns(batch: Batch, recorded_at: datetime) -> Columns:
    """One ``audit_log`` row per message, valid or not (seq and hashes come later)."""
    n = len(batch)
    errors = batch.errors
    # Comprehensions, not one loop appending to six lists: this runs for every message
    # on the auditor's polling thread. An invalid message's event is None; a stand-in
    # holds what can be read of its JSON (the fields the row keeps otherwise NULL).
    events: list[Any] = batch.events
    if errors:
        events = [
            e if e is not None else _invalid_stand_in(batch.values[i]) for i, e in enumerate(events)
        ]
    return {
        "topic": batch.topics,
        "partition": batch.partitions,
        "offset": batch.offsets,
        "recorded_at": [recorded_at] * n,
        "valid": [e is not None for e in batch.events],
        "event_id": [e["event_id"] for e in events],  # text already (events.validate)
        "job_id": [e["job_id"] for e in events],
        "event_type": [e["event_type"] for e in events],
        "occurred_at": [e["occurred_at"] for e in events],
        "validation_error": [safe_text(errors[i]) if i in errors else None for i in range(n)],
        "raw": [v or b"" for v in batch.values],
        "cluster_id": [batch.cluster_id] * n,
        "trace_id": [trace_id_of(e["trace_id"]) for e in events],
    }


def _invalid_stand_in(raw: bytes | None) -> dict[str, Any]:
    hint = _best_effort_fields(raw)
    return {
        "event_id": hint.get("event_id"),
        "job_id": hint.get("job_id"),
        "event_type": hint.get("event_type"),
        "occurred_at": None,
        "trace_id": None,
    }


def _best_effort_fields(raw: bytes | None) -> dict[str, str]:
    """Identifying fields of an invalid event, when its JSON is readable at all."""
    try:
        data = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):  # hostile input: deep nesting
        return {}
    if not isinstance(data, dict):
        return {}
    fields = ("event_id", "job_id", "event_type")
    return {k: safe_text(data[k], 200) for k in fields if data.get(k)}


_AUDIT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("hash_rule", pa.int32()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
        ("valid", pa.bool_()),
        ("event_id", pa.string()),
        ("job_id", pa.string()),
        ("event_type", pa.string()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("validation_error", pa.string()),
        ("raw", pa.binary()),
        ("prev_hash", pa.string()),
        ("hash", pa.string()),
        ("cluster_id", pa.string()),
        ("trace_id", pa.string()),
    ]
)
_INSERT_AUDIT = (
    'INSERT INTO audit_log (seq, hash_rule, topic, "partition", "offset", recorded_at, '
    "valid, event_id, job_id, event_type, occurred_at, validation_error, raw, prev_hash, "
    f"hash, cluster_id, trace_id, payload) SELECT *, {PAYLOAD_OF_RAW} FROM horizons_audit"
)


class AuditHandler(Handler):
    group = "compliance-auditor"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        # The chain's (seq, hash) as last committed; None = read it from the store.
        self._tail: tuple[int, str | None] | None = None
        self._pending: tuple[int, str | None] | None = None
        # Where the next prepared batch starts: the tail the batches before it will
        # leave (None until the first write has read the tail from the store).
        self._expected: tuple[int, str | None] | None = None
        # Signed heads (services/signing.py): the last one signed, and whether anything
        # but our own published heads arrived since (else a head would beget a head).
        self._signer: Ed25519PrivateKey | None = None
        # (seq, monotonic time); never signed: the first head is due at once, however
        # long the machine has been up (monotonic time counts from its boot).
        self._signed: tuple[int, float] = (0, float("-inf"))
        # The head signed in the batch being written: (seq, time, publication id).
        self._signing: tuple[int, float, str] | None = None
        self._events_since_head = False

    def topics(self) -> list[str]:
        s = self.settings
        return [
            s.topic_job_lifecycle,
            s.topic_job_metrics,
            s.topic_audit_trail,
            s.topic_system_health,
        ]

    def handle(self, batch: Batch) -> Tables:
        if any(key != HEAD_KEY for key in batch.keys):
            self._events_since_head = True
        return {"audit_log": audit_columns(batch, now())}

    def prepare(self, rows: Tables) -> None:
        # Chained on the polling thread, from the tail the previous batch will leave if
        # it commits as prepared; persist() checks that and chains again if not.
        columns = rows.get("audit_log")
        if columns and columns["offset"] and self._expected is not None:
            self._expected = chain_columns(columns, *self._expected)

    def persist(self, con: duckdb.DuckDBPyConnection, rows: Tables, *, dedupe: bool = True) -> None:
        # Replays never reach this point: the loop fences on the stored offsets, and the
        # UNIQUE (cluster_id, topic, partition, offset) constraint is the last line of
        # defence.
        columns = rows.pop("audit_log", None)
        if columns and columns["offset"]:
            # This host is the one writer of the chain (the store has one owner), so the
            # tail it committed last is the tail; it is read from the store only after a
            # start or a rolled-back transaction.
            last_seq, last_hash = self._tail or tables.audit_tail(con)
            seqs, prevs = columns.get("seq"), columns.get("prev_hash")
            if seqs and prevs and (seqs[0], prevs[0]) == (last_seq + 1, last_hash or GENESIS):
                self._pending = (seqs[-1], columns["hash"][-1])
            else:
                self._pending = self._expected = chain_columns(columns, last_seq, last_hash)
            data = {f.name: columns[f.name] for f in _AUDIT_SCHEMA}
            # Arrow takes the microseconds as they are; from datetimes it converts again.
            data["recorded_at"] = columns["recorded_us"]
            data["occurred_at"] = columns["occurred_us"]
            # Found by name by DuckDB (a replacement scan: no register/unregister).
            horizons_audit = tables.scan_once(pa.table(data, _AUDIT_SCHEMA))  # noqa: F841
            con.execute(_INSERT_AUDIT)
            if self._head_due():
                self._sign_head(con, *self._pending)
        super().persist(con, rows, dedupe=dedupe)

    def rollback(self) -> None:
        self._tail = self._pending = self._signing = None

    def after_commit(self, rows: Tables) -> None:
        if self._pending is not None:
            self._tail, self._pending = self._pending, None
        if self._signing is not None:
            seq, signed_at, publication = self._signing
            self._signed, self._signing = (seq, signed_at), None
            self._events_since_head = False
            if self.publish_soon is not None:
                # Kafka witnesses the head within moments, not at the next sweep.
                self.publish_soon([publication])

    def on_stop(self, store: StoreBase) -> None:
        """A last head over everything stored, so a restart begins fully signed."""
        if self._tail is None or self._tail[0] <= self._signed[0]:
            return
        seq, digest = self._tail
        store.write(lambda con: self._sign_head(con, seq, digest))
        self.after_commit({})

    # --- signed heads ----------------------------------------------------------------------

    def _head_due(self) -> bool:
        pending = self._pending
        return (
            pending is not None
            and pending[0] > self._signed[0]
            and self._events_since_head
            and time.monotonic() - self._signed[1] >= self.settings.audit_head_interval_s
        )

    def _sign_head(self, con: duckdb.DuckDBPyConnection, seq: int, digest: str | None) -> None:
        """Sign (seq, hash) into ``audit_heads`` and the publication outbox (for the
        ``audit-trail`` topic: Kafka as the witness), in the batch's transaction."""
        if self._signer is None:
            from horizons_platform.services.keys import load_or_create_private

            self._signer = load_or_create_private(self.settings)
        head = sign_head(self._signer, seq, digest or GENESIS)
        tables.insert(con, "audit_heads", [head.row()])
        record = ev.audit_record(
            self.group, HEAD_ACTION, head.as_json(), producer=f"{self.group}@{socket.gethostname()}"
        )
        key = HEAD_KEY.decode()
        row = tables.publication_row(self.settings.topic_audit_trail, record, key)
        tables.insert(con, "publications", [row])
        self._signing = (seq, time.monotonic(), row["publication_id"])


def iter_rows(
    con: duckdb.DuckDBPyConnection, batch: int = 50_000, after_seq: int = 0
) -> Iterator[dict[str, Any]]:
    # The hash takes the timestamps as microseconds: read as such, they need no datetime
    # (which cannot hold every instant DuckDB can: a row's year-10000 occurred_at, UTC,
    # came back as text and stopped every verification).
    names = (*AUDIT_COLUMNS, "recorded_at_us", "occurred_at_us")
    columns = ", ".join(f'"{c}"' for c in AUDIT_COLUMNS)
    cur = con.execute(
        f"SELECT {columns}, epoch_us(recorded_at), epoch_us(occurred_at) "
        "FROM audit_log WHERE seq > ? ORDER BY seq",
        [int(after_seq)],
    )
    while chunk := cur.fetchmany(batch):
        for values in chunk:
            yield dict(zip(names, values, strict=True))


def verify_store(con: duckdb.DuckDBPyConnection) -> ChainReport:
    cps = con.execute("SELECT removed_ranges FROM audit_checkpoints").fetchall()
    report = verify(iter_rows(con), [{"removed_ranges": c[0]} for c in cps])
    # Rule 2 rows: the payload column must be what their raw bytes say (one SQL scan).
    bad = con.execute(
        f"SELECT min(seq) FROM audit_log WHERE hash_rule = {RULE_RAW_BYTES} "
        f"AND payload IS DISTINCT FROM ({PAYLOAD_OF_RAW})"
    ).fetchall()[0][0]
    if bad is not None and (report.ok or bad < (report.first_bad_seq or 0)):
        before = con.execute("SELECT count(*) FROM audit_log WHERE seq < ?", [bad]).fetchall()
        return ChainReport(False, before[0][0], int(bad), "payload does not match its raw bytes")
    return report
