"""`horizons bench outbox`: how fast the notification outbox drains to an SMTP server.

The dispatcher of the platform (claims, kept SMTP sessions, outcomes written with the
next claim) against a no-op aiosmtpd server in its own process on loopback, so the
server never shares the dispatcher's GIL. The store is a real DuckDB file owned by this
process, pre-filled with ``emails`` notifications through the platform's own handler.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pyarrow as pa

from horizons_bench.harness import HOST, BenchContext
from horizons_bench.report import BenchResult, Figure, Target
from horizons_platform.ids import uuid7
from horizons_platform.runtime.outbox import OutboxDispatcher
from horizons_platform.services.notifications import message_id, notification_id
from horizons_platform.store.owner import StoreOwner, free_port
from horizons_platform.waiting import wait_until

RATE_TARGET = Target("ge", 1000)  # e-mails/s to a loopback SMTP server, sustained


def _fill(owner: StoreOwner, emails: int) -> None:
    now = datetime.now(UTC)
    # Ids as the platform mints them (time-ordered: ids.py).
    events = [str(uuid7()) for _ in range(emails)]
    ids = [notification_id(event_id, "completed") for event_id in events]
    notifications = pa.table(
        {
            "notification_id": ids,
            "event_id": events,
            "job_id": [f"bench-{i}" for i in range(emails)],
            "kind": ["completed"] * emails,
            "recipient": [f"owner-{i % 500}@observatory.example" for i in range(emails)],
            "subject": [f"[horizons] job bench-{i} completed" for i in range(emails)],
            "body": ["Your imaging job completed.\n"] * emails,
            "message_id": [message_id(n) for n in ids],
            "status": ["pending"] * emails,
            "attempts": [0] * emails,
            "created_at": [now] * emails,
            "next_attempt_at": [now] * emails,
        }
    )
    # The queue keeps its notification's created_at: every claim joins on it (schema.py,
    # migration 7), and a queue row without it is never claimed.
    queue = pa.table(
        {"notification_id": ids, "next_attempt_at": [now] * emails, "created_at": [now] * emails}
    )
    with owner.transaction() as con:
        con.register("_n", notifications)
        con.execute("INSERT INTO notifications BY NAME SELECT * FROM _n")
        con.register("_q", queue)
        con.execute("INSERT INTO notification_queue BY NAME SELECT * FROM _q")


def run(ctx: BenchContext, emails: int = 30_000, seed: int = 7) -> BenchResult:
    del seed  # nothing random here; accepted like every benchmark's
    result = BenchResult("outbox", params={"emails": emails})
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"{HOST}:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = ctx.settings("outbox", smtp_port=port)
    owner = StoreOwner(settings, serve=False)
    stop = threading.Event()
    try:
        owner.open()
        _fill(owner, emails)
        ctx.progress.say(f"outbox: {emails:,} notifications queued; sending to {HOST}:{port}")
        dispatcher = OutboxDispatcher(settings, owner, stop)
        started = time.monotonic()
        thread = threading.Thread(target=dispatcher.run, name="outbox", daemon=True)
        thread.start()
        dispatcher.wake()

        def sent() -> bool:
            n = int(owner.scalar("SELECT count(*) FROM notifications WHERE status = 'sent'"))
            ctx.progress.status(f"outbox: {n:,}/{emails:,} sent")
            return n >= emails

        wait_until(sent, timeout=max(120.0, emails / 50), interval=0.25, what="every e-mail")
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(30)
        failed = int(owner.scalar("SELECT count(*) FROM notifications WHERE status <> 'sent'"))
    finally:
        stop.set()
        owner.close()
        server.kill()
        server.wait(10)
    rate = emails / elapsed
    result.add(
        Figure(
            "e-mails sent",
            rate,
            "e-mails/s",
            RATE_TARGET,
            note=f"{emails:,} in {elapsed:.1f} s over {settings.smtp_connections} sessions",
        )
    )
    result.add(Figure("not sent at the end", failed, "e-mails", Target("eq", 0)))
    result.details = {"elapsed_s": round(elapsed, 2), "sessions": settings.smtp_connections}
    return result
