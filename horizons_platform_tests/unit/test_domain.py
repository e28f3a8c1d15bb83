"""Pure domain logic: job state machine, audit chain, health rules, metrics window,
job-row folding, traffic plans."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from horizons_platform import events as ev
from horizons_platform.services import audit
from horizons_platform.services import health_rules as rules
from horizons_platform.services.metrics import MetricsWindow, WindowEntry
from horizons_platform.services.notifications import message_id, notification_id
from horizons_platform.services.orchestrator import IllegalTransition, next_state
from horizons_platform.simulate import interleave, plan
from horizons_platform.store.tables import fold_job_updates

# --- job state machine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "event", "expected"),
    [
        (None, ev.JOB_SUBMITTED, "submitted"),
        ("submitted", ev.JOB_STARTED, "running"),
        ("running", ev.JOB_COMPLETED, "completed"),
        ("running", ev.JOB_FAILED, "failed"),
        ("submitted", ev.JOB_CANCELLED, "cancelled"),
        ("running", ev.JOB_CANCELLED, "cancelled"),
    ],
)
def test_legal_transitions(current: str | None, event: str, expected: str) -> None:
    assert next_state(current, event, "j") == expected


@pytest.mark.parametrize(
    ("current", "event"),
    [
        ("cancelled", ev.JOB_COMPLETED),
        ("completed", ev.JOB_FAILED),
        ("submitted", ev.JOB_COMPLETED),
        (None, ev.JOB_STARTED),
        ("running", ev.JOB_SUBMITTED),
        ("failed", ev.JOB_CANCELLED),
    ],
)
def test_illegal_transitions(current: str | None, event: str) -> None:
    with pytest.raises(IllegalTransition, match="job j"):
        next_state(current, event, "j")


# --- audit chain ---------------------------------------------------------------------------


def _rows(n: int) -> list[dict]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "event_id": f"e{i}",
            "job_id": f"j{i % 3}",
            "event_type": "job.started",
            "occurred_at": t0 + timedelta(seconds=i),
            "payload": f'{{"n": {i}}}',
            "raw": None,
            "valid": True,
        }
        for i in range(n)
    ]
    audit.chain(rows, 0, None)
    return rows


def test_chain_verifies_and_links() -> None:
    rows = _rows(5)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == audit.GENESIS
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 5))
    assert audit.verify(rows) == audit.ChainReport(True, 5)


@pytest.mark.parametrize("field", ["event_id", "job_id", "occurred_at", "payload", "event_type"])
def test_editing_any_covered_field_breaks_the_chain_at_that_row(field: str) -> None:
    rows = _rows(5)
    value = rows[2][field]
    rows[2][field] = value + timedelta(seconds=1) if field == "occurred_at" else '"x"'
    report = audit.verify(rows)
    assert not report.ok and report.first_bad_seq == 3 and report.checked == 2


def test_reordering_and_deleting_are_detected() -> None:
    rows = _rows(5)
    swapped = [rows[0], rows[2], rows[1], rows[3], rows[4]]
    assert not audit.verify(swapped).ok
    report = audit.verify([r for r in rows if r["seq"] != 3])
    assert not report.ok and report.first_bad_seq == 4 and "missing" in report.reason


def test_gaps_recorded_by_retention_are_accepted() -> None:
    rows = _rows(6)
    kept = [r for r in rows if r["seq"] not in (1, 2, 4)]
    checkpoint = {"removed_ranges": "[[1, 2], [4, 4]]"}
    assert audit.verify(kept, [checkpoint]).ok
    assert not audit.verify(kept, [{"removed_ranges": "[[1, 2]]"}]).ok


def test_payload_key_order_does_not_matter_but_values_do() -> None:
    row = _rows(1)[0]
    row["payload"] = '{"a": 1, "b": 2}'
    h = audit.link(audit.GENESIS, row)
    assert audit.link(audit.GENESIS, {**row, "payload": '{"b": 2, "a": 1}'}) == h
    assert audit.link(audit.GENESIS, {**row, "payload": '{"b": 2, "a": 3}'}) != h
    assert audit.link(audit.GENESIS, {**row, "raw": b"x", "valid": False}) != h


def test_the_batch_chain_hashes_exactly_as_the_verifier_links() -> None:
    # chain_columns hashes a batch of columns; verify() recomputes every row from the dicts.
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    columns = {
        "topic": ["job-lifecycle", "job-lifecycle", "audit-trail", "job-lifecycle"],
        "partition": [0, 1, 0, 2],
        "offset": [10, 11, 0, 7],
        "recorded_at": [t0] * 3 + [t0 + timedelta(microseconds=1)],
        "valid": [True, False, True, False],
        "event_id": ["e1", None, "e|3", "\ud800"],  # a lone surrogate from JSON
        "job_id": ["j1", "j2", None, "2:ab"],
        "event_type": ["job.started", None, "audit.record", "job.x"],
        "occurred_at": [t0 - timedelta(days=1), None, t0, t0 + timedelta(microseconds=3)],
        "validation_error": [None, "field required", None, "bad|\nvalue"],
        "raw": [b"{}", b"", b'{"a":1}', b"\xff"],
    }
    tail = audit.chain_columns(columns, 41, "f" * 64)
    rows = [{name: values[i] for name, values in columns.items()} for i in range(4)]
    assert [r["seq"] for r in rows] == [42, 43, 44, 45] and rows[0]["prev_hash"] == "f" * 64
    assert audit.verify(rows, start=(41, "f" * 64)).ok
    assert tail == (45, rows[-1]["hash"])
    assert columns["recorded_us"][3] - columns["recorded_us"][0] == 1
    rows[3]["recorded_at"] = t0
    assert audit.verify(rows, start=(41, "f" * 64)).first_bad_seq == 45


# --- health rules --------------------------------------------------------------------------

TH = rules.Thresholds(
    lag_messages=100,
    lag_seconds=30,
    error_rate=0.05,
    dead_letter_rate=0.1,
    min_events_for_rate=20,
    job_failures=0,
)


def _by_key(evals: list[rules.Evaluation]) -> dict[tuple[str, str], rules.Evaluation]:
    return {e.key: e for e in evals}


def test_rules_breach_above_threshold_only() -> None:
    snap = rules.Snapshot(
        lag_messages={"metrics": 101, "notifications": 100},
        lag_seconds={"metrics": 31, "notifications": 2},
        counts={"metrics": rules.GroupCounts(100, 6, 6), "audit": rules.GroupCounts(10, 9, 9)},
        job_failures=1,
    )
    got = _by_key(rules.evaluate(snap, TH))
    assert got[(rules.CONSUMER_LAG_MESSAGES, "metrics")].breached
    assert not got[(rules.CONSUMER_LAG_MESSAGES, "notifications")].breached
    assert got[(rules.CONSUMER_LAG_SECONDS, "metrics")].breached
    assert got[(rules.HANDLER_ERROR_RATE, "metrics")].breached
    assert not got[(rules.DEAD_LETTER_RATE, "metrics")].breached  # 0.06 <= 0.1
    # Too few events for a rate to mean anything.
    assert not got[(rules.HANDLER_ERROR_RATE, "audit")].breached
    assert got[(rules.JOB_FAILURES, "jobs")].breached
    assert not got[(rules.BROKER_UNREACHABLE, "kafka")].breached
    assert rules.evaluate(rules.Snapshot(broker_reachable=False), TH)[0].breached


def test_transitions_never_raise_an_open_alert_twice_and_see_recovery() -> None:
    breach = rules.Evaluation(rules.CONSUMER_LAG_MESSAGES, "metrics", 500, 100, "warning", True)
    calm = rules.Evaluation(rules.CONSUMER_LAG_MESSAGES, "metrics", 5, 100, "warning", False)
    first = rules.transitions([breach], {})
    assert first.raise_ == [breach] and not first.resolve
    again = rules.transitions([breach], {breach.key: "a1"})
    assert not again
    recovered = rules.transitions([calm], {breach.key: "a1"})
    assert recovered.resolve == [("a1", calm)] and not recovered.raise_


def test_rule_filter() -> None:
    evals = rules.evaluate(rules.Snapshot(lag_messages={"m": 1}), TH, rules=rules.LAG_RULES)
    assert {e.rule for e in evals} == {rules.CONSUMER_LAG_MESSAGES}


# --- metrics window, job folding, notifications, traffic -------------------------------------


def test_metrics_window_is_bounded_by_count_and_age() -> None:
    window = MetricsWindow(max_jobs=100, max_age_s=60)
    for i in range(1000):
        window.add(f"j{i}", WindowEntry(float(i), "img", "completed", float(i % 10), 1.0))
    assert len(window) == 100
    assert window.clear_old_metrics(now_s=900.0) == 0  # all newer than the cutoff (840)
    dropped = window.clear_old_metrics(now_s=1000.0)  # cutoff 940: drops 900..939
    assert dropped == 40 and len(window) == 60
    summary = window.summary()
    assert summary["jobs"] == 60 and summary["outcomes"] == {"completed": 60}
    assert 0 <= summary["p50_duration_s"] <= summary["p95_duration_s"] <= 9


def test_fold_job_updates_merges_in_order_and_derives_durations() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = fold_job_updates(
        [
            {"job_id": "a", "status": "submitted", "owner": "o", "submitted_at": t0},
            {"job_id": "b", "status": "submitted", "submitted_at": t0},
            {
                "job_id": "a",
                "status": "running",
                "owner": None,
                "started_at": t0 + timedelta(seconds=5),
            },
            {"job_id": "a", "status": "completed", "finished_at": t0 + timedelta(seconds=65)},
        ]
    )
    by_id = {r["job_id"]: r for r in rows}
    assert by_id["a"]["status"] == "completed" and by_id["a"]["owner"] == "o"
    assert by_id["a"]["duration_s"] == 60 and by_id["a"]["queue_time_s"] == 5
    assert by_id["b"]["duration_s"] is None


def test_notification_ids_are_stable_per_event_and_kind() -> None:
    a = notification_id("e1", "completed")
    assert a == notification_id("e1", "completed")
    assert a != notification_id("e1", "failed") and a != notification_id("e2", "completed")
    assert message_id(a) == f"<{a}@horizons.local>"


@pytest.mark.parametrize("event_id", ["e1", str(uuid.uuid4()), "ünïcode", "", "a:b" * 300])
def test_notification_ids_are_the_uuid5_of_event_and_kind(event_id: str) -> None:
    # The inlined form must keep every id ever stored: replays are deduplicated by it.
    from horizons_platform.services.notifications import _NAMESPACE

    for kind in ("completed", "failed", "cancelled", "submitted"):
        expected = str(uuid.uuid5(_NAMESPACE, f"{event_id}:{kind}"))
        assert notification_id(event_id, kind) == expected


def test_plan_is_deterministic_and_interleaving_keeps_each_job_in_order() -> None:
    jobs = plan(200, seed=3, prefix="p")
    assert [j.fate for j in jobs] == [j.fate for j in plan(200, seed=3, prefix="p")]
    fates = {j.fate for j in jobs}
    assert {"completed", "failed"} <= fates
    seen: dict[str, list[str]] = {}
    for job, step in interleave(jobs, seed=3):
        seen.setdefault(job.job_id, []).append(step)
    assert all(seen[j.job_id] == j.steps() for j in jobs)
