"""Verify the audit trail against its signed heads (what `verify-audit`, the chain check
and the compliance report run).

Four things must hold, each reported with the first bad seq or head:

1. every signed head and every retention checkpoint verifies under the trusted public
   key, and the checkpoints chain (none removed);
2. the rows chain (services/audit.py), across retention gaps to the hash the signed
   checkpoint recorded;
3. every signed head's seq still holds the hash it signed — unless a signed checkpoint
   removed it: a rewritten chain (every later hash recomputed) fails here, and so does a
   cut tail (a head beyond the last row);
4. the newest head published on ``audit-trail`` (Kafka, the witness outside the
   database) is in the store: deleting the newest heads with the rows they cover fails
   here.

Incremental: a run starts after the last verified (seq, hash) recorded in
``audit_verifications`` (checked to be unchanged), so it costs what was added since.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from horizons_platform.services.audit import (
    GENESIS,
    PAYLOAD_OF_RAW,
    RULE_RAW_BYTES,
    ChainReport,
    _covered,
    iter_rows,
    removed_seqs,
    verify,
)
from horizons_platform.services.signing import (
    SignedHead,
    checkpoint_is_signed_by,
    head_is_signed_by,
    key_id,
    public_pem,
)

if TYPE_CHECKING:
    import duckdb
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass
class TrailReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    heads_verified: int = 0
    newest_head: SignedHead | None = None
    unsigned_tail: int = 0  # rows after the newest signed head (normal while events flow)
    through: tuple[int, str] | None = None
    incremental_from: int | None = None
    notes: list[str] = field(default_factory=list)

    def fail(self, seq: int | None, reason: str) -> TrailReport:
        self.ok, self.first_bad_seq, self.reason = False, seq, reason
        return self

    def summary(self) -> str:
        scope = (
            f"{self.checked} records after seq {self.incremental_from}"
            if self.incremental_from
            else f"{self.checked} records"
        )
        if not self.ok:
            return (
                f"audit trail broken at seq {self.first_bad_seq}: {self.reason} ({scope} verified)"
            )
        head = (
            f"; newest signed head seq {self.newest_head.seq} "
            f"({self.newest_head.signed_at:%Y-%m-%d %H:%M:%S} UTC, key {self.newest_head.key_id})"
            if self.newest_head
            else "; no signed head yet"
        )
        return f"audit trail verified: {scope}, {self.heads_verified} signed heads{head}"


def _checkpoints(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cur = con.execute(
        "SELECT checkpoint_id, created_at, cutoff, removed_count, first_removed_seq, "
        "last_removed_seq, last_removed_hash, removed_ranges, prev_checkpoint_id, key_id, "
        "signature FROM audit_checkpoints ORDER BY created_at, checkpoint_id"
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _heads(con: duckdb.DuckDBPyConnection, after_seq: int) -> list[SignedHead]:
    rows = con.execute(
        "SELECT seq, hash, signed_at, key_id, signature FROM audit_heads "
        "WHERE seq > ? ORDER BY seq, signed_at",
        [after_seq],
    ).fetchall()
    return [SignedHead(int(s), h, t, k, sig) for s, h, t, k, sig in rows]


def _rows_intact_through(
    con: duckdb.DuckDBPyConnection, seq: int, checkpoints: list[dict[str, Any]]
) -> bool:
    """Every seq up to ``seq`` is there, except those a retention checkpoint removed."""
    removed = sum(
        max(0, min(hi, seq) - lo + 1) for lo, hi in removed_seqs(checkpoints) if lo <= seq
    )
    present = con.execute("SELECT count(*) FROM audit_log WHERE seq <= ?", [seq]).fetchall()
    return int(present[0][0]) == seq - removed


def last_verified(con: duckdb.DuckDBPyConnection) -> tuple[int, str] | None:
    """Where the last successful run ended, if that row is still as it was."""
    rows = con.execute(
        "SELECT v.through_seq, v.through_hash FROM audit_verifications v "
        "JOIN audit_log a ON a.seq = v.through_seq AND a.hash = v.through_hash "
        "ORDER BY v.verified_at DESC LIMIT 1"
    ).fetchall()
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def verify_trail(
    con: duckdb.DuckDBPyConnection,
    public: Ed25519PublicKey | None,
    *,
    full: bool = True,
    witness: SignedHead | None = None,
    on_rows: Callable[[int, int | None], None] | None = None,
) -> TrailReport:
    report = TrailReport(ok=True, checked=0)
    checkpoints = _checkpoints(con)
    start = None if full else last_verified(con)
    if start is not None and not _rows_intact_through(con, start[0], checkpoints):
        report.notes.append(
            f"records at or below seq {start[0]} (verified before) are missing: verifying all"
        )
        start = None
    after = start[0] if start else 0
    heads = _heads(con, after)
    first_head = con.execute("SELECT min(signed_at), min(seq) FROM audit_heads").fetchall()[0]

    # 1. signatures
    if public is None:
        if heads or any(cp["signature"] for cp in checkpoints):
            return report.fail(
                heads[0].seq if heads else None,
                "no trusted public key to check the signed heads with "
                "(the signing key's .pub file is missing; see HORIZONS_AUDIT_SIGNING_KEY_FILE)",
            )
        report.notes.append("no signing key yet: the chain alone was verified")
    trusted = key_id(public) if public is not None else None
    prev_id = None
    for cp in checkpoints:
        if cp["signature"] is None:
            legacy = first_head[0] is None or (
                cp["created_at"] < first_head[0]
                and all(hi < first_head[1] for _, hi in removed_seqs([cp]))
            )
            if legacy:
                report.notes.append(f"checkpoint {cp['checkpoint_id']} predates signing")
                continue
        if public is None or not checkpoint_is_signed_by(public, cp):
            return report.fail(
                cp["first_removed_seq"],
                f"retention checkpoint {cp['checkpoint_id']} is not signed by the trusted key "
                f"{trusted}: the records it claims to have removed were deleted otherwise",
            )
        if cp["prev_checkpoint_id"] != prev_id:
            return report.fail(
                cp["first_removed_seq"],
                f"retention checkpoint {cp['checkpoint_id']} follows {cp['prev_checkpoint_id']}, "
                f"but the checkpoint before it is {prev_id}: a checkpoint was removed",
            )
        prev_id = cp["checkpoint_id"]
    for head in heads:
        if public is None or not head_is_signed_by(public, head):
            return report.fail(
                head.seq,
                f"the head at seq {head.seq} (signed at {head.signed_at:%Y-%m-%d %H:%M:%S}) "
                f"is not signed by the trusted key {trusted}: forged",
            )
        report.heads_verified += 1

    # 2. the rows chain
    if start is not None:
        report.incremental_from = start[0]
    rows = iter_rows(con, after_seq=after)
    if on_rows is not None:
        total = con.execute("SELECT count(*) FROM audit_log WHERE seq > ?", [after]).fetchall()
        rows = _counted(rows, on_rows, int(total[0][0]))
    chain: ChainReport = verify(rows, checkpoints, start or (0, GENESIS))
    report.checked = chain.checked
    report.through = chain.through
    if not chain.ok:
        return report.fail(chain.first_bad_seq, chain.reason)
    bad_payload = con.execute(
        f"SELECT min(seq) FROM audit_log WHERE seq > ? AND hash_rule = {RULE_RAW_BYTES} "
        f"AND payload IS DISTINCT FROM ({PAYLOAD_OF_RAW})",
        [after],
    ).fetchall()[0][0]
    if bad_payload is not None:
        report.checked = int(
            con.execute(
                "SELECT count(*) FROM audit_log WHERE seq > ? AND seq < ?", [after, bad_payload]
            ).fetchall()[0][0]
        )
        return report.fail(int(bad_payload), "payload does not match its raw bytes")

    # 3. every head against its row (one query; only mismatches come back)
    max_seq = con.execute("SELECT max(seq) FROM audit_log").fetchall()[0][0] or 0
    mismatches = con.execute(
        "SELECT h.seq, h.signed_at, a.hash IS NULL FROM audit_heads h "
        "LEFT JOIN audit_log a ON a.seq = h.seq "
        "WHERE a.hash IS DISTINCT FROM h.hash ORDER BY h.seq"
    ).fetchall()
    spans = removed_seqs(checkpoints)
    for seq, signed_at, missing in mismatches:
        if missing and _covered(seq, seq, spans):
            continue  # removed by a signed retention checkpoint
        if missing and seq > max_seq:
            return report.fail(
                max_seq + 1,
                f"tail cut: a head signed at {signed_at:%Y-%m-%d %H:%M:%S} covers seq {seq}, "
                f"but the log ends at seq {max_seq}",
            )
        if missing:
            return report.fail(seq, f"seq {seq}, covered by a signed head, is missing")
        return report.fail(
            seq,
            f"chain rewritten: seq {seq} no longer holds the hash signed at "
            f"{signed_at:%Y-%m-%d %H:%M:%S} (an edit at or before it, every later hash "
            "recomputed)",
        )
    newest = heads[-1] if heads else _newest_head(con)
    report.newest_head = newest
    report.unsigned_tail = max(0, max_seq - (newest.seq if newest else 0))

    # 4. the latest report names the key everything was verified with
    reports = con.execute(
        "SELECT report_id, generated_at, key_id, public_key FROM compliance_reports "
        "WHERE key_id IS NOT NULL ORDER BY generated_at DESC LIMIT 1"
    ).fetchall()
    if reports and public is not None:
        rid, at, kid, pem = reports[0]
        if kid != trusted or (pem or "").strip() != public_pem(public).strip():
            return report.fail(
                None,
                f"the latest compliance report ({rid}, {at:%Y-%m-%d %H:%M} UTC) names signing "
                f"key {kid}, but the trusted key is {trusted}: the report was altered",
            )

    # 5. the witness
    if witness is not None:
        if public is None or not head_is_signed_by(public, witness):
            report.notes.append(
                f"a head on audit-trail (seq {witness.seq}) is not signed by the trusted key"
            )
        elif newest is None or witness.seq > newest.seq:
            cut = witness.seq > max_seq
            return report.fail(
                max_seq + 1 if cut else witness.seq,
                f"Kafka witnessed a head at seq {witness.seq} (signed at "
                f"{witness.signed_at:%Y-%m-%d %H:%M:%S}) that the store does not hold "
                f"(its newest is {newest.seq if newest else 'none'})"
                + (f"; the log ends at seq {max_seq}: tail cut" if cut else ""),
            )
        else:
            report.notes.append(f"Kafka's newest published head (seq {witness.seq}) is held")
    return report


def _counted(
    rows: Iterator[dict[str, Any]], on_rows: Callable[[int, int | None], None], total: int
) -> Iterator[dict[str, Any]]:
    for n, row in enumerate(rows, start=1):
        if n % 50_000 == 0:
            on_rows(n, total)
        yield row
    on_rows(total, total)


def _newest_head(con: duckdb.DuckDBPyConnection) -> SignedHead | None:
    rows = con.execute(
        "SELECT seq, hash, signed_at, key_id, signature FROM audit_heads "
        "ORDER BY seq DESC, signed_at DESC LIMIT 1"
    ).fetchall()
    return SignedHead(int(rows[0][0]), *rows[0][1:]) if rows else None


def record_verification(con: Any, report: TrailReport, full: bool) -> None:
    """Remember where a successful run ended (the next one starts there)."""
    if not report.ok or report.through is None or report.through[0] == 0:
        return
    con.execute(
        "INSERT INTO audit_verifications VALUES (?, ?, ?, ?, ?, ?)",
        [
            datetime.now(UTC),
            report.through[0],
            report.through[1],
            report.newest_head.seq if report.newest_head else None,
            full,
            report.checked,
        ],
    )
