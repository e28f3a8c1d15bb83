"""`horizons bench audit`: verification of a large audit trail, full and incremental.

A trail of N records (default 3,000,000) is written the way the auditor writes it —
chained by services/audit.py in batches of 50,000, heads signed by the signing key —
into a DuckDB file of its own. Then: a full verification (rows/s), 1,000 new records
and a head, and the incremental verification a user's next `verify-audit` runs (the
target: < 1 s).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from horizons_bench.harness import BenchContext
from horizons_bench.report import BenchResult, Figure, Target
from horizons_platform.kafka.records import Batch
from horizons_platform.services.audit import AuditHandler, audit_columns
from horizons_platform.services.audit_check import check_trail
from horizons_platform.services.keys import load_or_create_private
from horizons_platform.services.signing import sign_head
from horizons_platform.store.client import Store
from horizons_platform.store.tables import audit_tail

INCREMENTAL_TARGET = Target("le", 1.0)  # s: verify-audit after 1,000 new records
BATCH = 50_000


def _append(store: Store, handler: AuditHandler, n: int, first_offset: int) -> None:
    """``n`` records as the auditor stores them, then a signed head over them."""
    key = load_or_create_private(store.settings)
    done = 0
    while done < n:
        size = min(BATCH, n - done)
        values: list[bytes | None] = [
            json.dumps(
                {
                    "event_id": str(uuid.uuid4()),
                    "event_type": "job.submitted",
                    "job_id": f"bench-{first_offset + done + i}",
                    "occurred_at": "2026-01-01T00:00:00Z",
                    "producer": "bench",
                    "schema_version": 1,
                    "payload": {"owner": "bench@observatory.example", "job_type": "imaging"},
                }
            ).encode()
            for i in range(size)
        ]
        offsets = list(range(first_offset + done, first_offset + done + size))
        batch = Batch.decode(
            ["bench"] * size, [0] * size, offsets, [None] * size, values, [0] * size
        )
        with store.transaction() as con:
            handler.persist(con, {"audit_log": audit_columns(batch, datetime.now(UTC))})
        handler.after_commit({})
        done += size
    with store.transaction() as con:
        seq, digest = audit_tail(con)
        con.execute(
            "INSERT INTO audit_heads VALUES (?, ?, ?, ?, ?)",
            list(sign_head(key, seq, digest or "").row().values()),
        )


def run(
    ctx: BenchContext, records: int = 3_000_000, new: int = 1_000, seed: int = 7
) -> BenchResult:
    result = BenchResult("audit", params={"records": records, "new": new})
    settings = ctx.settings("audit")
    store = Store(settings)
    store.ensure_schema()
    handler = AuditHandler(settings)
    started = time.monotonic()
    _append(store, handler, records, 0)
    ctx.progress.say(f"audit: {records:,} records written in {time.monotonic() - started:.0f} s")

    started = time.monotonic()
    full = check_trail(store, settings, full=True, witness=False)
    full_s = time.monotonic() - started
    if not full.ok:
        result.passed = False
        result.notes.append(full.summary())
    result.add(Figure("full verification", full_s, "s", note=f"{full.checked:,} records"))
    result.add(Figure("full verification rate", full.checked / full_s, "records/s"))

    _append(store, handler, new, records)
    started = time.monotonic()
    incremental = check_trail(store, settings, witness=False)
    inc_s = time.monotonic() - started
    if not incremental.ok or incremental.checked != new:
        result.passed = False
        result.notes.append(f"incremental: {incremental.summary()}")
    result.add(
        Figure(
            f"verify-audit after {new:,} new records",
            inc_s,
            "s",
            INCREMENTAL_TARGET,
            note=f"{incremental.checked:,} records after seq {incremental.incremental_from}",
        )
    )
    result.notes.append("Kafka witness not asked (this trail was never published)")
    return result
