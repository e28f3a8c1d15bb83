"""Produced vs stored, table by table: what was lost, what was doubled, does the audit
chain verify. Read once the consumers have stopped (the DuckDB lock is then free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from horizons_bench.offsets import TP
from horizons_bench.workload import Ledger
from horizons_platform.services.audit import verify_store
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store

# (table, SQL counting rows, SQL counting distinct identities): a difference is a double.
_COUNTS = {
    "job_events": (
        "SELECT count(*) FROM job_events",
        "SELECT count(DISTINCT event_id) FROM job_events",
    ),
    "jobs": ("SELECT count(*) FROM jobs", "SELECT count(DISTINCT job_id) FROM jobs"),
    "job_metrics": (
        "SELECT count(*) FROM job_metrics",
        "SELECT count(DISTINCT event_id) FROM job_metrics",
    ),
    "audit_log": (
        "SELECT count(*) FROM audit_log",
        'SELECT count(DISTINCT (topic, "partition", "offset")) FROM audit_log',
    ),
    "notifications": (
        "SELECT count(*) FROM notifications",
        "SELECT count(DISTINCT event_id || ':' || kind) FROM notifications",
    ),
    "dead_letters": (
        "SELECT count(*) FROM dead_letters",
        'SELECT count(DISTINCT (consumer_group, topic, "partition", "offset")) FROM dead_letters',
    ),
}


@dataclass
class TableCount:
    table: str
    expected: int
    stored: int
    distinct: int
    covered: int | None = None  # distinct rows inside the expected scope (default: all)
    extra_allowed: bool = False  # rows beyond the expectation are legitimate here

    @property
    def doubled(self) -> int:
        return self.stored - self.distinct

    @property
    def lost(self) -> int:
        covered = self.distinct if self.covered is None else self.covered
        return max(0, self.expected - covered)

    @property
    def extra(self) -> int:
        return 0 if self.extra_allowed else max(0, self.distinct - self.expected)


@dataclass
class Verification:
    tables: list[TableCount]
    chain_ok: bool
    chain_checked: int
    chain_error: str
    offsets_behind: dict[str, int]  # group → messages its DuckDB offsets are short of the end
    audit_event_doubles: int  # valid audit rows of job events sharing an event_id
    notifications_by_status: dict[str, int]
    emails_distinct: int | None = None
    emails_expected: int | None = None
    emails_resent: int | None = None  # same Message-ID received twice (SMTP is at-least-once)
    # The platform's own events (consumer.started, health.*, audit.record) leave through
    # the publication outbox, at-least-once into Kafka (docs/decisions.md): a host killed
    # between Kafka's acknowledgement and the outbox delete has its successor send the
    # event again, and the auditor records both deliveries. Reported, not a loss or double.
    platform_repeats: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return sum(t.lost for t in self.tables) + sum(self.offsets_behind.values())

    @property
    def doubled(self) -> int:
        return sum(t.doubled for t in self.tables) + self.audit_event_doubles

    @property
    def emails_missing(self) -> int:
        if self.emails_expected is None or self.emails_distinct is None:
            return 0
        return max(0, self.emails_expected - self.emails_distinct)

    def problems(self) -> list[str]:
        out = [
            f"{t.table}: {t.lost} lost (expected {t.expected}, stored {t.distinct} distinct)"
            for t in self.tables
            if t.lost
        ]
        out += [f"{t.table}: {t.doubled} doubled" for t in self.tables if t.doubled]
        out += [f"{t.table}: {t.extra} unexpected rows" for t in self.tables if t.extra]
        out += [
            f"{g}: DuckDB offsets {n} short of the end" for g, n in self.offsets_behind.items() if n
        ]
        if self.audit_event_doubles:
            out.append(f"audit_log: {self.audit_event_doubles} event_ids recorded twice")
        if not self.chain_ok:
            out.append(f"audit chain broken: {self.chain_error}")
        if self.emails_missing:
            out.append(f"e-mail: {self.emails_missing} notifications never reached SMTP")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    def rows(self) -> list[list[object]]:
        return [[t.table, t.expected, t.stored, t.lost, t.doubled] for t in self.tables]

    def render(self) -> str:
        header = f"{'table':<14}{'produced':>10}{'stored':>10}{'lost':>7}{'doubled':>9}"
        lines = [header, "-" * len(header)]
        for t in self.tables:
            lines.append(f"{t.table:<14}{t.expected:>10,}{t.stored:>10,}{t.lost:>7}{t.doubled:>9}")
        lines.append(
            f"audit chain: {'verified' if self.chain_ok else 'BROKEN'} ({self.chain_checked:,} "
            f"records); notifications: {self.notifications_by_status}"
        )
        if self.emails_expected is not None:
            lines.append(
                f"e-mails: {self.emails_distinct:,} of {self.emails_expected:,} received "
                f"({self.emails_resent} re-sent with the same Message-ID)"
            )
        if self.platform_repeats:
            lines.append(
                f"platform events delivered twice by the publication outbox (at-least-once, "
                f"a host killed before deleting them): {self.platform_repeats}"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": {
                t.table: {
                    "expected": t.expected,
                    "stored": t.stored,
                    "lost": t.lost,
                    "doubled": t.doubled,
                    "unexpected": t.extra,
                }
                for t in self.tables
            },
            "chain_ok": self.chain_ok,
            "chain_checked": self.chain_checked,
            "chain_error": self.chain_error,
            "offsets_behind": self.offsets_behind,
            "audit_event_doubles": self.audit_event_doubles,
            "platform_repeats": self.platform_repeats,
            "notifications_by_status": self.notifications_by_status,
            "emails": {
                "expected": self.emails_expected,
                "distinct": self.emails_distinct,
                "resent": self.emails_resent,
            },
            "problems": self.problems(),
            **self.extra,
        }


def _audited_below(con: Any, ends: dict[TP, int]) -> int:
    if not ends:
        return 0
    con.register(
        "_bench_ends",
        pa.table(
            {
                "topic": [t for t, _ in ends],
                "p": [p for _, p in ends],
                "e": list(ends.values()),
            }
        ),
    )
    try:
        row = con.execute(
            'SELECT count(DISTINCT (a.topic, a."partition", a."offset")) FROM audit_log a '
            'JOIN _bench_ends e ON a.topic = e.topic AND a."partition" = e.p '
            'AND a."offset" < e.e'
        ).fetchall()  # DuckDB 2: a result left unfetched blocks register()
    finally:
        con.unregister("_bench_ends")
    return int(row[0][0])


def expected_rows(
    settings: Settings, ledger: Ledger, ends: dict[TP, int], groups: list[str]
) -> dict[str, int]:
    """What each table must hold after every group consumed everything in ``ends``."""
    topics = group_topics(settings)
    auditor = set(topics["compliance-auditor"])
    dead = sum(n for g in groups for t, n in ledger.invalid_by_topic.items() if t in topics[g])
    wanted = {
        "job_events": ledger.valid_events,
        "jobs": ledger.jobs,
        "job_metrics": ledger.by_kind["job.metrics"],
        # The auditor stores every message of its topics, the platform's own included.
        "audit_log": sum(n for (t, _), n in ends.items() if t in auditor),
        "notifications": ledger.terminal,
    }
    owners = {
        "job_events": "metrics",
        "jobs": "metrics",
        "job_metrics": "metrics",
        "audit_log": "compliance-auditor",
        "notifications": "notifications",
    }
    out = {t: n if owners[t] in groups else 0 for t, n in wanted.items()}
    out["dead_letters"] = dead
    return out


def verify(
    settings: Settings,
    ledger: Ledger,
    ends: dict[TP, int],
    groups: list[str],
    emails: tuple[int, int] | None = None,
) -> Verification:
    """Compare the store with the ledger. ``emails`` = (distinct received, total received)."""
    expected = expected_rows(settings, ledger, ends, groups)
    store = Store(settings)
    topics = group_topics(settings)
    with store.reader() as con:
        tables = []
        for table, (count_sql, distinct_sql) in _COUNTS.items():
            stored = int(con.execute(count_sql).fetchall()[0][0])
            distinct = int(con.execute(distinct_sql).fetchall()[0][0])
            count = TableCount(table, expected[table], stored, distinct)
            if table == "audit_log":
                # The platform keeps publishing its own events (health alerts, consumer
                # stop notices) after the measured end: judge only offsets below it.
                count.covered = _audited_below(con, ends)
                count.extra_allowed = True
            tables.append(count)
        chain = verify_store(con)
        audit_doubles, platform_repeats = (
            int(n)
            for n in con.execute(
                "SELECT count(*) FILTER (job) - count(DISTINCT event_id) FILTER (job), "
                "count(*) FILTER (NOT job) - count(DISTINCT event_id) FILTER (NOT job) "
                "FROM (SELECT event_id, starts_with(event_type, 'job.') AS job FROM audit_log "
                "WHERE valid AND event_id IS NOT NULL)"
            ).fetchall()[0]
        )
        stored_offsets = con.execute(
            'SELECT consumer_group, topic, "partition", next_offset FROM consumer_offsets'
        ).fetchall()
        statuses = dict(
            con.execute("SELECT status, count(*) FROM notifications GROUP BY ALL").fetchall()
        )
    committed = {(g, t, p): o for g, t, p, o in stored_offsets}
    behind = {
        g: sum(
            max(0, n - committed.get((g, t, p), 0)) for (t, p), n in ends.items() if t in topics[g]
        )
        for g in groups
    }
    result = Verification(
        tables=tables,
        chain_ok=chain.ok,
        chain_checked=chain.checked,
        chain_error=chain.reason,
        offsets_behind=behind,
        audit_event_doubles=audit_doubles,
        platform_repeats=platform_repeats,
        notifications_by_status=statuses,
    )
    if emails is not None and "notifications" in groups:
        distinct, total = emails
        result.emails_expected = ledger.terminal
        result.emails_distinct = distinct
        result.emails_resent = total - distinct
    return result
