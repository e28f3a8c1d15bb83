"""No silent loss (issue 11), each case against a real broker and a real DuckDB file:
a replaced cluster, messages Kafka deleted before a group read them, an alert raised
while the broker is down, dead letters fixed and replayed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from horizons_bench.harness import derive, free_port_block
from horizons_bench.smtp import SmtpSink
from horizons_platform import events as ev
from horizons_platform.host import Host
from horizons_platform.kafka.admin import end_offsets, ensure_topics, list_watermarks
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.kafka.consumer import EXIT_OFFSETS, EXIT_OK, EXIT_STORE, ConsumerLoop
from horizons_platform.kafka.producer import Publisher
from horizons_platform.runtime.monitor import apply_evaluations
from horizons_platform.runtime.publications import STOP_GRACE_S, enqueue, publish
from horizons_platform.services import health_rules
from horizons_platform.services.audit import AuditHandler
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import free_port
from horizons_platform.waiting import wait_until
from horizons_platform_tests.conftest import make_settings
from horizons_platform_tests.support import (
    horizons,
    read_topic,
    run_jobs,
    start_consumer,
    stop_consumer,
)

OWNER = "ada@observatory.example"
AUDITOR = "compliance-auditor"


@pytest.fixture
def private_broker(tmp_path: Path, smtp: SmtpSink) -> Iterator[tuple[EmbeddedBroker, Settings]]:
    """A broker of this test's own (it is stopped, wiped and replaced here)."""
    port = free_port_block(2)  # restarted on the same ports: outside the ephemeral range
    controller = port + 1
    var = tmp_path / "var"
    broker = EmbeddedBroker(
        Settings(var_dir=var, broker_port=port, broker_controller_port=controller)  # type: ignore[arg-type]
    )
    broker.start(progress=lambda _: None)
    try:
        settings = make_settings(
            f"127.0.0.1:{port}",
            var,
            smtp.port,
            broker_port=port,
            broker_controller_port=controller,
            broker_grace_s=120.0,
        )
        yield broker, settings
    finally:
        broker.stop()


def _audited(store: Store, prefix: str) -> tuple[int, int]:
    """(rows, distinct events) in audit_log for jobs named ``prefix``-*."""
    _, rows = store.query(
        "SELECT count(*), count(DISTINCT event_id) FROM audit_log WHERE job_id LIKE ?",
        [f"{prefix}-%"],
    )
    return rows[0]


def test_a_replaced_cluster_stops_the_group_loudly_until_its_offsets_are_reset(
    private_broker: tuple[EmbeddedBroker, Settings], tmp_path: Path
) -> None:
    broker, settings = private_broker
    store = Store(settings)
    store.ensure_schema()
    log = tmp_path / "consume.log"
    proc = start_consumer(settings, log, services=[AUDITOR])
    try:
        before = run_jobs(settings, "before", 10)
        wait_until(lambda: _audited(store, "before") == (before, before), 60, what="first jobs")

        # The runbook's old recovery step, with the auditor running: stop the broker,
        # remove its data, start it again — a new cluster behind the same address.
        broker.stop()
        shutil.rmtree(broker.data_dir)
        broker.start(progress=lambda _: None)
        ensure_topics(settings)
        after = run_jobs(settings, "after", 4)

        code = proc.wait(120)
        output = log.read_text()
        print(output[-3000:])
        assert code == EXIT_OFFSETS, output[-3000:]
        assert "horizons offsets reset --group compliance-auditor --to earliest" in output
        assert "but the broker is cluster" in output or "high watermark" in output
        assert _audited(store, "after")[0] == 0  # nothing stored at the wrong offsets
        _, alerts = store.query(
            "SELECT severity, message FROM health_alerts WHERE rule = 'offsets_invalid'"
        )
        assert alerts and alerts[0][0] == "critical"

        shown = horizons(settings, "offsets", "show", "--group", AUDITOR)
        print(shown.stdout)
        assert shown.returncode == 1 and "OTHER CLUSTER" in shown.stdout

        refused = horizons(settings, "offsets", "reset", "--group", AUDITOR, "--to", "earliest")
        assert refused.returncode == 1 and "--yes" in refused.stderr  # confirmation asked

        reset = horizons(
            settings, "offsets", "reset", "--group", AUDITOR, "--to", "earliest", "--yes"
        )
        print(reset.stdout, reset.stderr)
        assert reset.returncode == 0, reset.stderr
        assert horizons(settings, "offsets", "show", "--group", AUDITOR).returncode == 0

        proc = start_consumer(settings, log, services=[AUDITOR])
        wait_until(lambda: _audited(store, "after") == (after, after), 60, what="new events")
        # The reset itself is in the audit trail, and the group's alert is resolved.
        wait_until(
            lambda: store.scalar(
                "SELECT count(*) FROM audit_log WHERE (payload->>'$.action') = 'offsets.reset'"
            ),
            60,
            what="the reset's audit record",
        )
        assert (
            store.scalar(
                "SELECT count(*) FROM health_alerts "
                "WHERE rule = 'offsets_invalid' AND resolved_at IS NULL"
            )
            == 0
        )
        print(f"produced after the replacement: {after}, stored: {_audited(store, 'after')}")
    finally:
        stop_consumer(proc, log)


class _FirstConsumerGetsNoAnswer(ConsumerLoop):
    """The real loop, except that its first consumer talks to an address where no broker
    listens: a consumer that hears nothing while the cluster answers every other client
    (CI once saw that after a cluster was replaced; the host waited out its whole grace
    period and exited "broker unreachable"). Its checks run at a test's pace; the
    defaults (10 s, 30 s) leave librdkafka's own reconnect backoff time to work."""

    wedge_check_s = 2.0
    wedged_after_s = 4.0

    def _new_consumer(self) -> Consumer:
        if getattr(self, "_answered_once", False):
            return super()._new_consumer()
        self._answered_once = True
        real = self.settings
        self.settings = derive(real, kafka_bootstrap=f"127.0.0.1:{free_port()}")
        try:
            return super()._new_consumer()
        finally:
            self.settings = real


def test_a_consumer_that_hears_nothing_while_the_cluster_answers_others_is_replaced(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    settings = derive(settings, broker_grace_s=120.0)
    loop = _FirstConsumerGetsNoAnswer(AuditHandler(settings), settings, store)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(loop.run()), daemon=True)
    with caplog.at_level(logging.WARNING, logger="horizons_platform.kafka.consumer"):
        thread.start()
        try:
            jobs = run_jobs(settings, "unheard", 3)
            wait_until(
                lambda: _audited(store, "unheard") == (jobs, jobs),
                60,
                what="the jobs, stored through a new consumer",
            )
            assert thread.is_alive()
        finally:
            loop.stop()
            thread.join(30)
    assert codes == [EXIT_OK]
    assert "broker still unreachable after" in caplog.text
    assert "the cluster has answered new clients for" in caplog.text


def test_commands_against_a_cluster_that_does_not_answer_say_so_in_one_line(
    settings: Settings, store: Store
) -> None:
    closed = free_port()  # nothing listens there: a broker that is down
    offline = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{closed}"})
    # Any command's failure goes through the same line (cli._describe); offsets show is
    # the one that also quiets its own client, and gives up within ~10 s.
    cli = horizons(offline, "offsets", "show", timeout=120)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and "librdkafka" not in cli.stderr, cli.stderr[:2000]
    assert f"Kafka at 127.0.0.1:{closed} did not answer" in lines[0], lines[0]
    assert "horizons broker status" in lines[0], lines[0]


def test_offsets_moved_past_the_cluster_under_an_idle_group_are_caught_by_the_watch(
    settings: Settings, tmp_path: Path
) -> None:
    """The periodic check runs off the loop's thread (kafka/offsets_watch.py): with no
    batch, rebalance or outage to trigger the loop's own check, the watch must notice
    stored offsets the cluster cannot have (a restored backup, a hand edit) and the
    group must stop loudly, as on an assignment."""
    store = Store(settings)
    store.ensure_schema()
    log = tmp_path / "consume.log"
    proc = start_consumer(settings, log, services=[AUDITOR], offsets_check_interval_s=1)
    try:
        first = run_jobs(settings, "watched", 3)
        wait_until(lambda: _audited(store, "watched") == (first, first), 60, what="first jobs")
        # Idle: the last signed head is recorded and nothing has arrived for 3 s, so no
        # batch's fencing can be what notices the edit below.
        wait_until(
            lambda: store.scalar(
                "SELECT now() - max(recorded_at) > INTERVAL 3 SECOND FROM audit_log"
            ),
            60,
            what="the auditor idle",
        )
        edited = horizons(
            settings,
            "query",
            "--write",
            "UPDATE consumer_offsets SET next_offset = next_offset + 1000",
        )
        assert edited.returncode == 0, edited.stderr

        code = proc.wait(60)
        output = log.read_text()
        print(output[-3000:])
        assert code == EXIT_OFFSETS, output[-3000:]
        assert "stored offsets look off" in output  # the watch, not a batch, noticed
        assert "above the partition's high watermark" in output
        assert "horizons offsets reset --group compliance-auditor --to earliest" in output
        assert "fenced" not in output
    finally:
        stop_consumer(proc, log)


def test_a_producer_that_outlived_its_cluster_makes_no_fresh_producer_lose_a_message(
    private_broker: tuple[EmbeddedBroker, Settings],
) -> None:
    # A host's producer lives through the cluster behind the address being replaced.
    # Had it written on with the idempotence id (PID) of the old cluster, the new one
    # would have accepted it (brokers take any sequence from an unknown PID), and the
    # next fresh producer — handed the same PID, as PIDs start from zero again — would
    # have had its message acknowledged as a "duplicate" and never written.
    broker, settings = private_broker
    ensure_topics(settings)
    topic = settings.topic_job_lifecycle
    outlived = Publisher(settings)
    outlived.send(topic, b"before", key="before")

    broker.stop()
    shutil.rmtree(broker.data_dir)
    broker.start(progress=lambda _: None)
    ensure_topics(settings)
    after = outlived.send(topic, b"after", key="same-key")
    fresh = Publisher(settings).send(topic, b"fresh", key="same-key")

    assert (fresh.partition, fresh.offset) == (after.partition, after.offset + 1)
    assert sorted(m.value() for m in read_topic(settings, topic)) == [b"after", b"fresh"]


def test_messages_deleted_before_the_group_read_them_raise_an_alert_with_the_count(
    settings: Settings, host_factory: Callable[..., Host]
) -> None:
    store = Store(settings)
    host = host_factory(settings, (AUDITOR,))
    first = run_jobs(settings, "kept", 4)
    wait_until(lambda: _audited(store, "kept") == (first, first), 60, what="first jobs")
    host.stop()
    host.join(30)

    # While the group is stopped, jobs arrive and Kafka's retention deletes them unread.
    deleted = run_jobs(settings, "expired", 6)
    topic = settings.topic_job_lifecycle
    ends = end_offsets(settings, [topic])
    admin = AdminClient(settings.kafka_config())
    # Retention deletes on each replica by itself, and the group reads from the leaders.
    # So the leaders' log start is what must move: waiting for every follower to confirm
    # its own (operation_timeout > 0) once took a loaded 3-node cluster over 30 s.
    futures = admin.delete_records(
        [TopicPartition(t, p, o) for (t, p), o in ends.items()], operation_timeout=0
    )
    for future in futures.values():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.REQUEST_TIMED_OUT:  # followers still due
                raise
    wait_until(
        lambda: {tp: low for tp, (low, _) in list_watermarks(admin, list(ends)).items()} == ends,
        60,
        what="the leaders to delete the records",
    )

    host_factory(settings, (AUDITOR,))
    last = run_jobs(settings, "later", 2)
    wait_until(lambda: _audited(store, "later") == (last, last), 60, what="later jobs")
    _, alerts = store.query(
        "SELECT value, message FROM health_alerts WHERE rule = 'messages_lost' ORDER BY subject"
    )
    print("\n".join(m for _, m in alerts))
    assert sum(v for v, _ in alerts) == deleted
    assert all("deleted by Kafka before this group read them" in m for _, m in alerts)
    assert _audited(store, "expired") == (0, 0)


def test_an_alert_raised_while_the_broker_is_down_reaches_kafka_when_it_returns(
    private_broker: tuple[EmbeddedBroker, Settings], host_factory: Callable[..., Host]
) -> None:
    broker, settings = private_broker
    store = Store(settings)
    host_factory(settings, (AUDITOR,))
    broker.stop()

    breach = health_rules.Evaluation("consumer_lag_messages", "drill", 5000, 1000, "warning", True)
    apply_evaluations(settings, store, Publisher(settings, delivery_timeout_s=2.0), [breach])
    # Committed with the alert, waiting in the outbox: the alert and its audit record.
    assert store.scalar("SELECT count(*) FROM health_alerts WHERE subject = 'drill'") == 1
    waiting = store.query("SELECT topic, value FROM publications")[1]
    assert sum(t == settings.topic_system_health for t, _ in waiting) == 1
    assert sum("health.alert.raised" in v for _, v in waiting) == 1

    broker.start(progress=lambda _: None)
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM publications WHERE value LIKE '%drill%'") == 0,
        90,
        what="the outbox to drain once the broker is back",
    )
    alerts = [
        json.loads(m.value())
        for m in read_topic(settings, settings.topic_system_health)
        if dict(m.headers() or []).get("event_type") == ev.HEALTH_ALERT.encode()
    ]
    assert [a["payload"]["subject"] for a in alerts].count("drill") == 1
    wait_until(
        lambda: store.scalar(
            "SELECT count(*) FROM audit_log WHERE (payload->>'$.action') = "
            "'health.alert.raised' AND (payload->>'$.details.subject') = 'drill'"
        ),
        60,
        what="the alert's record in the audit trail",
    )


def test_the_outbox_waits_for_every_delivery_report_unless_its_host_stops(
    settings: Settings, store: Store
) -> None:
    """Kafka unreachable (nothing listens at the address). A publication is settled by
    its delivery report, however late (librdkafka gives it within the delivery timeout;
    leaving it in flight once had the next sweep send it again, and both copies
    arrived); a stopping host waits at most STOP_GRACE_S more and keeps it in the outbox."""
    unreachable = derive(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    event = ev.audit_record("test", "drill", {}, "test")
    with store.transaction() as con:
        enqueue(con, settings.topic_audit_trail, event, key="drill")

    def outbox() -> list[tuple[int, str | None]]:
        return store.query("SELECT attempts, last_error FROM publications")[1]

    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    assert publish(store, Publisher(unreachable), stop=stop) == (0, 1)
    assert time.monotonic() - started < 0.5 + STOP_GRACE_S + 2
    assert outbox() == [(0, None)]  # no report yet: still in flight when it gave up

    started = time.monotonic()
    assert publish(store, Publisher(unreachable, delivery_timeout_s=12.0)) == (0, 1)
    assert time.monotonic() - started >= 11.5  # past the 10 s it once waited at most
    [(attempts, error)] = outbox()
    assert attempts == 1 and error and "timed out" in error.lower()


def _event(job_id: str, event_type: str, payload: dict[str, object]) -> dict[str, object]:
    event = ev.new_event(
        {ev.JOB_STARTED: ev.JobStarted, ev.JOB_COMPLETED: ev.JobCompleted}[event_type],
        producer="test",
        job_id=job_id,
        payload=payload,
    )
    return json.loads(ev.encode(event))


def test_dead_letters_fixed_and_replayed_are_stored_once_and_never_move_a_job_back(
    settings: Settings, host_factory: Callable[..., Host], tmp_path: Path
) -> None:
    store = Store(settings)
    host_factory(settings, ("metrics", AUDITOR))
    publisher = Publisher(settings)
    orch = JobOrchestratorService(settings, recover=False)
    orch.submit_job("dlq-done", owner=OWNER, job_type="imaging")
    started = _event(
        "dlq-done", ev.JOB_STARTED, {"worker": "w1", "owner": OWNER, "job_type": "imaging"}
    )
    orch.start_job("dlq-done")
    orch.complete_job("dlq-done")
    # Three events that break the schema: a start without its worker's type, two
    # completions whose output size is not a number.
    broken = []
    for i in range(2):
        good = _event(
            f"dlq-{i}",
            ev.JOB_COMPLETED,
            {"output_bytes": 10, "owner": OWNER, "job_type": "imaging"},
        )
        broken.append((good, {**good, "payload": {**good["payload"], "output_bytes": "lots"}}))
    old_start = {**started, "payload": {**started["payload"], "worker": {"not": "a name"}}}
    broken.append((started, old_start))
    for _, bad in broken:
        publisher.send(
            settings.topic_job_lifecycle, json.dumps(bad).encode(), key=str(bad["job_id"])
        )
    wait_until(
        lambda: (
            store.scalar(
                'SELECT count(DISTINCT (topic, "partition", "offset")) FROM dead_letters '
                "WHERE consumer_group = 'metrics'"
            )
            == 3
        ),
        60,
        what="three dead letters",
    )
    wait_until(
        lambda: store.scalar("SELECT status FROM jobs WHERE job_id = 'dlq-done'") == "completed", 60
    )

    listed = horizons(settings, "dlq", "list", "--group", "metrics", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    letters = {json.loads(x["raw"])["event_id"]: x["ref"] for x in json.loads(listed.stdout)}
    assert len(letters) == 3
    shown = horizons(settings, "dlq", "show", letters[broken[0][1]["event_id"]])
    assert shown.returncode == 0 and "output_bytes" in shown.stdout

    # Fix each and replay it, twice: stored once.
    for good, bad in broken:
        fixed = tmp_path / f"{good['event_id']}.json"
        fixed.write_text(json.dumps(good))
        ref = letters[bad["event_id"]]
        first = horizons(settings, "dlq", "replay", ref, "--value-file", str(fixed), "--yes")
        assert first.returncode == 0, first.stderr
        again = horizons(settings, "dlq", "replay", ref, "--yes")
        assert again.returncode == 0 and "already replayed" in again.stdout
        forced = horizons(
            settings, "dlq", "replay", ref, "--value-file", str(fixed), "--yes", "--force"
        )
        assert forced.returncode == 0, forced.stderr
    ids = [str(good["event_id"]) for good, _ in broken]
    wait_until(
        lambda: (
            store.scalar(
                "SELECT count(*) FROM audit_log WHERE valid AND event_id IN (?, ?, ?)", ids
            )
            == 6
        ),  # two deliveries each (replayed, then forced), both audited
        60,
        what="the replays to be audited",
    )
    wait_until(
        lambda: (
            store.scalar("SELECT count(*) FROM job_events WHERE event_id IN (?, ?, ?)", ids) == 3
        ),
        60,
        what="each replayed event stored once",
    )
    # The old job.started, replayed after its job completed, leaves it completed.
    assert store.scalar("SELECT status FROM jobs WHERE job_id = 'dlq-done'") == "completed"
    wait_until(
        lambda: (
            store.scalar(
                "SELECT count(*) FROM audit_log WHERE (payload->>'$.action') = 'dlq.replay'"
            )
            == 6
        ),
        60,
        what="every replay in the audit trail",
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("chattr") is None,
    reason="the fault (an immutable WAL file) needs root and chattr",
)
def test_a_failing_store_stops_the_consumer_with_nothing_dead_lettered_or_committed(
    settings: Settings, tmp_path: Path
) -> None:
    store = Store(settings)
    store.ensure_schema()
    log = tmp_path / "consume.log"
    groups = [AUDITOR, "metrics"]
    proc = start_consumer(settings, log, services=groups, store_retry_s=3)
    wal = Path(f"{settings.database}.wal")
    try:
        first = run_jobs(settings, "ok", 5)
        wait_until(lambda: _audited(store, "ok") == (first, first), 60, what="first jobs")
        wait_until(
            lambda: (
                store.scalar("SELECT count(*) FROM job_events WHERE job_id LIKE 'ok-%'") == first
            ),
            60,
            what="the metrics group's first jobs",
        )
        wait_until(wal.exists, 10, what="the WAL file")
        # The disk refuses every write of the store (as a full or failing disk would).
        subprocess.run(["chattr", "+i", str(wal)], check=True)
        try:
            second = run_jobs(settings, "refused", 5)
            code = proc.wait(120)
        finally:
            subprocess.run(["chattr", "-i", str(wal)], check=True)
        output = log.read_text()
        # DuckDB 1.5.5 can abort the process while reverting a COMMIT the disk refused
        # (an internal error on its own index, "RevertCommit" in the stack): a DuckDB
        # defect, not a clean exit. Everything below about the data must hold anyway.
        duckdb_abort = code == -signal.SIGABRT and "RevertCommit" in output
        if not duckdb_abort:
            assert code == EXIT_STORE, output[-3000:]
            assert "the store kept failing" in output and "retrying the batch" in output

        assert store.scalar("SELECT count(*) FROM dead_letters") == 0
        assert _audited(store, "refused") == (0, 0)
        topic = settings.topic_job_lifecycle
        stored = {
            (g, p): o
            for g, p, o in store.query(
                'SELECT consumer_group, "partition", next_offset FROM consumer_offsets '
                "WHERE topic = ?",
                [topic],
            )[1]
        }
        for group in groups:
            assert sum(o for (g, _), o in stored.items() if g == group) == first
            # Kafka's committed offsets never ran ahead of what the store holds.
            consumer = Consumer(settings.kafka_config(**{"group.id": group}))
            try:
                committed = consumer.committed(
                    [TopicPartition(topic, p) for p in range(6)], timeout=10
                )
            finally:
                consumer.close()
            for tp in committed:
                assert tp.offset <= stored.get((group, tp.partition), 0), (group, tp)

        # The fault removed: everything arrives, once.
        proc = start_consumer(settings, log, services=groups)
        wait_until(lambda: _audited(store, "refused") == (second, second), 60, what="the rest")
        wait_until(
            lambda: (
                store.scalar("SELECT count(*) FROM job_events WHERE job_id LIKE 'refused-%'")
                == second
            ),
            60,
            what="the metrics group's rows",
        )
        print(f"produced during the fault: {second}, stored after it: {_audited(store, 'refused')}")
        if duckdb_abort:
            pytest.xfail("DuckDB 1.5.5 aborted while reverting the refused COMMIT (data exact)")
    finally:
        stop_consumer(proc, log)
