"""SIGKILL the consumer host again and again during a 20,000-event stream: afterwards
every table holds exactly the expected rows, every e-mail arrived (repeats carry the
same Message-ID) and the audit chain verifies."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from horizons_bench.smtp import SmtpSink
from horizons_platform.kafka.admin import end_offsets
from horizons_platform.services.audit import verify_store
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import start_consumer, stop_consumer

KILLS = 6


def _caught_up(store: Store, settings: Settings, ends: dict[str, int]) -> bool:
    _, rows = store.query(
        "SELECT consumer_group, topic, sum(next_offset) FROM consumer_offsets GROUP BY ALL"
    )
    done = {(g, t): n for g, t, n in rows}
    wanted = {
        "notifications": [settings.topic_job_lifecycle],
        "metrics": [settings.topic_job_lifecycle, settings.topic_job_metrics],
        "compliance-auditor": [settings.topic_job_lifecycle, settings.topic_job_metrics],
    }
    return all(done.get((g, t), 0) >= ends[t] for g, topics in wanted.items() for t in topics)


def test_sigkill_during_a_20k_event_stream_loses_and_doubles_nothing(
    settings: Settings, smtp: SmtpSink, tmp_path: Path
) -> None:
    store = Store(settings)
    store.ensure_schema()  # the file exists before anyone polls it
    jobs = plan(5100, seed=11, prefix="crash")
    expected_events = sum(len(j.steps()) for j in jobs)
    assert expected_events >= 20_000
    terminal = len(jobs)  # every job ends completed, failed or cancelled: one e-mail each

    log = tmp_path / "consume.log"
    proc = start_consumer(settings, log, health_interval_s=1)
    orch = JobOrchestratorService(settings, recover=False, wait=False)
    producer = threading.Thread(
        target=run_simulation, args=(orch, jobs), kwargs={"rate": 1500.0, "seed": 11}, daemon=True
    )
    producer.start()
    rng = random.Random(5)
    kills = 0
    try:
        while kills < KILLS:
            # Let it get partitions and make some progress, then kill it mid-batch.
            wait_until(
                lambda k=kills: log.read_text().count("assigned") >= len(SERVICE_GROUPS) * (k + 1),
                timeout=60,
                what="consumers assigned",
            )
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment to crash at
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start_consumer(settings, log, health_interval_s=1)
        producer.join(60)
        assert not producer.is_alive()
        ends = {
            t: sum(end_offsets(settings, [t]).values())
            for t in (settings.topic_job_lifecycle, settings.topic_job_metrics)
        }
        assert sum(ends.values()) == expected_events
        wait_until(
            lambda: _caught_up(store, settings, ends), timeout=120, what="consumers caught up"
        )
        wait_until(
            lambda: (
                store.scalar("SELECT count(*) FROM notifications WHERE status = 'sent'") == terminal
            ),
            timeout=90,
            what="all notifications sent",
        )
    finally:
        stop_consumer(proc, log)

    def one(sql: str) -> int:
        return int(store.scalar(sql))  # type: ignore[arg-type]

    assert one("SELECT count(*) FROM job_events") == expected_events
    assert one("SELECT count(DISTINCT event_id) FROM job_events") == expected_events
    assert one("SELECT count(*) FROM jobs") == len(jobs)
    _, statuses = store.query("SELECT job_id, status FROM jobs")
    assert dict(statuses) == {j.job_id: j.outcome for j in jobs}
    assert one("SELECT count(*) FROM job_metrics") == len(jobs)
    assert one("SELECT count(*) FROM audit_log WHERE job_id LIKE 'crash-%'") == expected_events
    assert one('SELECT count(DISTINCT (topic, "partition", "offset")) FROM audit_log') == one(
        "SELECT count(*) FROM audit_log"
    )
    assert one("SELECT count(*) FROM dead_letters") == 0
    assert one("SELECT count(*) FROM notifications") == terminal
    with store.reader() as con:
        chain = verify_store(con)
    assert chain.ok, chain

    _, rows = store.query("SELECT message_id FROM notifications")
    expected_ids = {r[0] for r in rows}
    received = Counter(smtp.message_ids())
    assert set(received) == expected_ids, "an e-mail was lost or unknown"
    repeats = sum(n - 1 for n in received.values())
    recorded = one("SELECT sum(resends) FROM notifications")
    print(
        f"\n{kills} kills: {expected_events} events, {terminal} e-mails, "
        f"{repeats} repeated e-mails (same Message-ID), {recorded} resends recorded"
    )
    assert repeats <= recorded, "a repeat happened that the outbox did not count"
