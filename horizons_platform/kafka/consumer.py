"""THE consumer loop: one implementation, used by all four services.

Per batch: poll (by count and by time) → decode the batch once, column by column → the
service's handler → one DuckDB transaction holding the rows, the dead letters and the
group's next offsets (:class:`~horizons_platform.kafka.checkpoint.Checkpoint`) → commit
the same offsets to Kafka (so Kafka's tools show lag). The transaction of batch N runs
on a writer thread while the loop polls and decodes batch N+1: DuckDB works outside
the GIL, so the two overlap on two cores. Only the loop's thread calls the Kafka
consumer: confluent-kafka (2.16) lets one thread at a time into a consumer, so a
commit from the writer thread would wait out the loop's poll, with the writer idle. On
every assignment the loop seeks to the offsets stored in DuckDB, which makes DuckDB —
not Kafka — the truth: a crash between the two commits replays nothing that was stored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from horizons_platform.kafka import offsets
from horizons_platform.kafka.admin import answers_a_new_client
from horizons_platform.kafka.checkpoint import (
    BatchAbandoned,
    Checkpoint,
    DeadLetter,
    StoreFailed,
    is_store_failure,
)
from horizons_platform.kafka.offsets_watch import OffsetsWatch
from horizons_platform.kafka.producer import Publisher
from horizons_platform.kafka.records import Batch, Handler, Tables, now
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase, is_conflict
from horizons_platform.threads import name_this_thread

if TYPE_CHECKING:
    from horizons_platform.runtime.prometheus import HostMetrics

log = logging.getLogger(__name__)

# Records a breach as an alert (health_alerts and the publication outbox); the host
# wires it: (rule, subject, value, threshold, severity, message).
AlertSink = Callable[[str, str, float, float, str, str], object]

EXIT_OK = 0
EXIT_BROKER_LOST = 3
EXIT_FENCED = 5  # Kafka kept fencing this member: another live host has its instance id
EXIT_OFFSETS = 6  # the stored offsets do not belong to this cluster (kafka/offsets.py)
EXIT_STORE = 7  # the store kept failing (I/O, memory) past store_retry_s; nothing committed

SIGNAL_INTERVAL_S = 1.0
# Stored offsets are checked against the cluster on every assignment, after a broker
# outage, when the store fenced records, and when the watch (kafka/offsets_watch.py),
# which looks every offsets_check_interval_s off the loop's thread, suspects them.
DLQ_MAX_VALUE_BYTES = 512 * 1024
POLL_SLICE_S = 0.005
# After a batch's first message, the rest of its fetch answer is taken within this
# (librdkafka hands an answer's partitions to the queue one after the other).
CLUMP_S = 0.002
# How often Kafka's committed offsets are read back and compared with what was stored.
COMMIT_CHECK_S = 5.0
# A loop that got nothing for this long asks the broker for metadata: librdkafka's error
# callback alone does not always say that the broker is gone (see _probe_when_idle).
IDLE_PROBE_S = 5.0
# A member fenced this often within the window is fenced by another live host with the
# same group.instance.id, not by librdkafka's own rejoin (see _rejoin): it stops.
MAX_REJOINS = 3
REJOIN_WINDOW_S = 600.0


def static_member_id(settings: Settings, group: str, topics: list[str]) -> str | None:
    """The group.instance.id of this host's member of ``group``, or None (dynamic).

    The topics are part of the id: a static member that comes back with another
    subscription would be handed its old assignment (topics it no longer reads) without
    a rebalance, and consume nothing."""
    if not settings.consumer_instance_id:
        return None
    digest = hashlib.sha256(",".join(sorted(topics)).encode()).hexdigest()
    return f"{group}.{settings.consumer_instance_id}.{digest[:8]}"


class ConsumerLoop:
    # During an outage a new client is asked every ``wedge_check_s`` whether the cluster
    # answers it (the same period paces the "still unreachable" log lines). A consumer
    # that still hears nothing once the cluster has answered new clients for
    # ``wedged_after_s`` is replaced (see _wedged): longer than librdkafka's own
    # reconnect backoff (reconnect.backoff.max.ms, 10 s), so a consumer about to
    # reconnect by itself is left alone.
    wedge_check_s = 10.0
    wedged_after_s = 30.0

    def __init__(
        self,
        handler: Handler,
        settings: Settings,
        store: StoreBase,
        *,
        publisher: Publisher | None = None,
        stop_event: threading.Event | None = None,
        client_id: str | None = None,
        raise_alerts: AlertSink | None = None,
        metrics: HostMetrics | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.store = store
        self.group = handler.group
        self.publisher = publisher or Publisher(settings)
        self.stop_event = stop_event or threading.Event()
        self.ready = threading.Event()  # set once partitions are assigned
        self._broker_down_since: float | None = None
        self._fatal: KafkaError | None = None
        self._next_probe = 0.0
        self._probe_delay = 0.5
        self._probe_error = ""  # why the last probe got no answer
        self._next_wedge_check = math.inf
        self._answered_elsewhere_since: float | None = None
        self._heard_at = time.monotonic()  # the broker last answered (messages, a probe)
        self._last_signals = time.monotonic()
        # Records alerts (health_alerts + the publication outbox); the host wires it.
        self.raise_alerts = raise_alerts
        self.metrics = metrics
        self.refused: str | None = None  # why the stored offsets must not be used
        self._next_offsets_check = math.inf  # the loop's own check, when not on assignment
        self._held: list[tuple[str, int]] = []  # the partitions assigned now
        self._watch = OffsetsWatch(
            settings, self.group, store, lambda: self._held, settings.offsets_check_interval_s
        )
        self._client_id = client_id or f"{self.group}-{socket.gethostname()}-{os.getpid()}"
        self.checkpoint = Checkpoint(
            handler, store, send_dead_letters=self._send_dead_letters, extra_rows=self._signals
        )
        # One writer thread: batch N's transaction runs there while batch N+1 is polled.
        self._writer = ThreadPoolExecutor(
            1, thread_name_prefix=f"store-{self.group}", initializer=self._writer_started
        )
        self._in_flight: Future[dict[tuple[str, int], int]] | None = None
        # Per partition held whose stored next offset Kafka has not yet been seen to
        # hold: that offset and when it was last sent (_verify_commits).
        self._unverified: dict[tuple[str, int], tuple[int, float]] = {}
        self._next_commit_check = 0.0
        self._generation = 0  # rebalances seen (see _poll)
        self._rejoins: list[float] = []  # when Kafka fenced this member (see _rejoin)
        self._consumer = self._new_consumer()

    def _writer_started(self) -> None:
        name_this_thread()
        self.store.lean_writer()

    def _new_consumer(self) -> Consumer:
        config: dict[str, object] = {
            "group.id": self.group,
            "client.id": self._client_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # The broker answers a fetch when 64 KiB are there or after the batch
            # window: that answer is the loop's batch (see _poll). At a few thousand
            # events/s an answer per produced message (fetch.min.bytes=1) kept the
            # broker busy on 4 groups' fetches and every process short of CPU on two
            # cores (produce → committed p99 ~1 s at 1,000 events/s).
            "fetch.wait.max.ms": max(1, round(self.settings.batch_max_wait_s * 1000)),
            "fetch.min.bytes": 65536,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            # Bounds how long close() waits on a dead coordinator (default 60 s).
            "socket.timeout.ms": 10_000,
            "error_cb": self._on_error,
        }
        # Static membership: a host restarted after a crash (or its standby, which has
        # the same id) gets its partitions back at once instead of waiting out the dead
        # member's session.
        instance_id = static_member_id(self.settings, self.group, self.handler.topics())
        if instance_id is not None:
            config["group.instance.id"] = instance_id
        return Consumer(self.settings.kafka_config(**config))

    # --- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> int:
        """Consume until stopped (exit 0) or the broker stays lost past the grace period."""
        self._subscribe()
        self._watch.start()
        code = EXIT_OK
        try:
            while not self.stop_event.is_set():
                messages = self._records(self._poll())
                if self._fatal is not None:
                    if self._rejoin():
                        continue  # what that poll returned is read again from the store's offsets
                    code = EXIT_FENCED
                    break
                # Messages librdkafka fetched before an outage still come out of its queue:
                # they say nothing about the broker, only an answer to a probe does. (CI's
                # broker-fault drill: each such batch ended the "outage" and forced an
                # offsets check that waited 10 s on the dead broker, so a host meant to
                # stop 5 s into the outage stopped after 42 s.)
                if messages and self._broker_down_since is not None and self._broker_still_down():
                    code = EXIT_BROKER_LOST
                    break
                if self._due_offsets_check():
                    self._recheck_offsets()
                if self.refused is not None:
                    code = EXIT_OFFSETS  # nothing of this poll is stored or committed
                    break
                polled = time.monotonic()
                if messages:
                    self._heard_at = polled
                batch = self._batch(messages) if messages else None
                if batch is not None:
                    if self.metrics is not None:
                        self.metrics.observe_consumed(self.group, batch.topics)
                    rows = self.checkpoint.prepare(batch)
                    self._finish_in_flight()
                    self._in_flight = self._writer.submit(self._store, batch, rows, polled)
                else:
                    self._finish_in_flight()
                    self._probe_when_idle()
                    if self._broker_down_since is not None and self._broker_still_down():
                        code = EXIT_BROKER_LOST
                        break
                    self._maybe_flush_signals()
                self._verify_commits()
            self._finish_in_flight()
        except BatchAbandoned as exc:
            log.warning("%s: %s", self.group, exc)
        except Exception as exc:
            if not is_store_failure(exc):
                raise
            log.error(
                "%s: stopping: %s; no offset was committed past what is stored — fix the "
                "store and start again, nothing is lost",
                self.group,
                exc,
            )
            code = EXIT_STORE
        finally:
            self._close(code)
        return code

    def _poll(self) -> list[Any]:
        """One batch: what the broker's next fetch answer brings, taken the moment it
        arrives, plus whatever else is queued (up to batch_max_messages).

        The batch window is the broker's: it holds each fetch for up to
        ``batch_max_wait_s`` (fetch.wait.max.ms) unless 64 KiB are there first, so a
        quiet stream arrives in one clump per window and a busy one in 64 KiB clumps.
        Waiting out a window of our own after that (what the loop once did) added the
        fetch's wait to every record's, 20 ms at p99, and cost the broker five fetches
        per window instead of one.

        While the previous batch's transaction runs, the queue is polled in slices of
        POLL_SLICE_S so that batch's offsets go to Kafka as soon as it is stored."""
        wanted, wait = self.settings.batch_max_messages, self.settings.batch_max_wait_s
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            in_flight = self._in_flight is not None
            first = self._consumer.poll(min(POLL_SLICE_S, remaining) if in_flight else remaining)
            if self._in_flight is not None and self._in_flight.done():
                self._finish_in_flight()
            if first is None:
                continue
            generation = self._generation
            rest = self._consumer.consume(num_messages=wanted - 1, timeout=CLUMP_S)
            if generation != self._generation:
                # A rebalance ran inside consume(): ``first`` may belong to a partition
                # given away (the ones kept restart from the stored offsets anyway).
                return rest
            return [first, *rest]

    def _store(
        self, batch: Batch, rows: Tables | None, polled: float = 0.0
    ) -> dict[tuple[str, int], int]:
        """On the writer thread: the batch's transaction; returns the offsets to commit
        to Kafka. A failing store is retried with backoff for ``store_retry_s``, then
        :class:`StoreFailed`. A write conflict is retried until it clears: the store
        works, another transaction holds rows the batch writes (a client's open write
        transaction), and stopping every group for it — `horizons up` stops the
        platform with its host — would punish the wrong party."""
        delay, deadline = 0.2, None
        commit_started = time.monotonic()
        while True:
            try:
                next_offsets = self.checkpoint.commit(batch, rows)
                break
            except Exception as exc:
                if not is_store_failure(exc):
                    raise
                if is_conflict(exc):
                    if self.stop_event.is_set():
                        raise BatchAbandoned(
                            "stopped while another transaction held rows of the batch being "
                            "written; nothing of it is stored or committed (read again at "
                            "the next start)"
                        ) from exc
                    log.warning(
                        "%s: another transaction holds rows this batch writes (%s); "
                        "retrying in %.1fs, nothing committed. A client's open write "
                        "transaction? `horizons store status` lists the sessions, "
                        "`horizons store disconnect` ends one",
                        self.group,
                        exc,
                        delay,
                    )
                else:
                    now = time.monotonic()  # the retry period runs from the first failure
                    deadline = deadline or now + self.settings.store_retry_s
                    if now >= deadline or self.stop_event.is_set():
                        raise StoreFailed(
                            f"{self.group}: the store kept failing for "
                            f"{self.settings.store_retry_s:.0f}s (HORIZONS_STORE_RETRY_S): {exc}"
                        ) from exc
                    log.warning(
                        "%s: store failure, retrying the batch in %.1fs (nothing committed): %s",
                        self.group,
                        delay,
                        exc,
                    )
                self.stop_event.wait(delay)
                delay = min(delay * 2, 5.0)
        if self.metrics is not None:
            self.metrics.observe_batch(
                self.group, batch.topics, polled, commit_started, batch.timestamps
            )
        return next_offsets

    def _finish_in_flight(self) -> None:
        """Wait for the batch being written. A store failure surfaces here and stops the
        loop without committing anything."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        self._commit_to_kafka(future.result())

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            self.handler.topics(), on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    def _rejoin(self) -> bool:
        """After a fatal error the consumer is dead: it fetches nothing more, for good.
        librdkafka fences its own static member when a session times out while the
        group's coordinator moves (librdkafka#3437; CI's node-loss drill: the auditor
        stopped for good at 1,019 of 20,000 events, "Static consumer fenced by other
        consumer with same group.instance.id" on an OffsetCommit), so a fence is first
        answered with a new consumer under the same id, which resumes from the stored
        offsets like any assignment. Only the owner of the store consumes, so no other
        host of ours can hold the id; one that keeps fencing us anyway (MAX_REJOINS in
        REJOIN_WINDOW_S) stops this loop (exit 5). False then."""
        assert self._fatal is not None
        reason, self._fatal = self._fatal.str(), None
        now = time.monotonic()
        self._rejoins = [t for t in self._rejoins if now - t < REJOIN_WINDOW_S]
        if len(self._rejoins) >= MAX_REJOINS:
            log.error(
                "%s: stopping: %s — fenced %d times in %.0f s: another live member of the "
                "group uses this host's group.instance.id (HORIZONS_GROUP_INSTANCE_ID)",
                self.group,
                reason,
                len(self._rejoins) + 1,
                REJOIN_WINDOW_S,
            )
            return False
        self._rejoins.append(now)
        self._replace_consumer(reason)
        return True

    def _replace_consumer(self, reason: str) -> None:
        log.error(
            "%s: %s; rejoining the group with a new consumer (it resumes from the stored "
            "offsets: nothing is lost or read twice)",
            self.group,
            reason,
        )
        self._finish_in_flight()  # stored; its commit to Kafka fails quietly
        self._unverified.clear()
        self._generation += 1
        old, self._consumer = self._consumer, self._new_consumer()
        self._close_consumer(old)
        self._subscribe()

    def _close_consumer(self, consumer: Consumer) -> None:
        """close() leaves the group; with the broker gone it can only wait for its own
        request timeouts (socket.timeout.ms), so it runs on a watchdog thread and the
        process may exit past it — the socket dies with the process."""
        closer = threading.Thread(target=consumer.close, name=f"close-{self.group}", daemon=True)
        closer.start()
        closer.join(self.settings.shutdown_timeout_s)
        if closer.is_alive():
            log.warning(
                "%s: consumer close still waiting on the broker after %.0fs",
                self.group,
                self.settings.shutdown_timeout_s,
            )

    def _close(self, code: int) -> None:
        self._watch.stop()
        try:
            if self._in_flight is not None and not self._in_flight.done():
                self._in_flight.exception()  # let the transaction finish, whatever it says
            self._writer.shutdown(wait=True)
            self._maybe_flush_signals(force=True)
            if code in (EXIT_OK, EXIT_BROKER_LOST):
                self.handler.on_stop(self.store)
        except Exception:  # the store may be the reason we stop
            log.exception("%s: could not flush health signals", self.group)
        broker_gone = code == EXIT_BROKER_LOST or self.broker_down
        self.publisher.flush(2.0 if broker_gone else None)
        self._close_consumer(self._consumer)
        log.info("%s: consumer closed (exit %d)", self.group, code)

    # --- rebalance: DuckDB holds the truth about where to resume -------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        self._finish_in_flight()
        start = self._check_offsets(consumer, [(tp.topic, tp.partition) for tp in partitions])
        if start is None:
            consumer.assign([])  # refused: consume nothing; the loop stops at once
            return
        for tp in partitions:
            tp.offset = start.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        # Kafka's committed offsets may be behind the store's: a host that stopped after
        # the broker was gone past the grace period stored its last batches but could not
        # commit them to Kafka, and where nothing new arrives this member would never
        # commit again — the lag the monitor and Kafka's tools show would stay up for
        # good (CI: all four groups "behind" by the last ~25 events, a lag alert that
        # never recovered). The next commit check reads them back and brings Kafka level.
        self._unverified = {tp: (offset, 0.0) for tp, offset in start.items() if offset >= 0}
        consumer.assign(partitions)
        self._held = [(tp.topic, tp.partition) for tp in partitions]
        self.ready.set()
        log.info("%s: assigned %d partitions", self.group, len(partitions))

    def _check_offsets(
        self, consumer: Consumer, assigned: list[tuple[str, int]]
    ) -> dict[tuple[str, int], int] | None:
        """Check the stored offsets of ``assigned`` against the cluster (kafka/offsets.py):
        where to resume, or None (and :attr:`refused` set) when they must not be used."""
        with self.store.transaction() as con:
            stored = tables.stored_positions(con, self.group)
        cluster_id, marks = offsets.read_positions(consumer, assigned)
        verdict = offsets.assess(self.group, assigned, stored, cluster_id, marks)
        self._next_offsets_check = math.inf
        if not verdict.ok:
            self.refused = "\n  ".join(verdict.refused)
            log.error("%s: stopping: stored offsets refused:\n  %s", self.group, self.refused)
            self._alert(offsets.OFFSETS_INVALID, self.group, 1.0, 0.0, "critical", self.refused)
            return None
        for loss in verdict.lost:
            message = (
                f"group {self.group}: {loss.count} messages of {loss.topic}[{loss.partition}] "
                f"(offsets {loss.stored}..{loss.low - 1}) were deleted by Kafka before this "
                f"group read them; continuing from offset {loss.low}"
            )
            log.error("%s", message)
            subject = f"{self.group} {loss.topic}[{loss.partition}]@{loss.stored}"
            self._alert(offsets.MESSAGES_LOST, subject, loss.count, 0.0, "critical", message)
        self.checkpoint.cluster_id = cluster_id
        # A partition seen for the first time starts at its low watermark, and says so in
        # the store: messages Kafka deletes there before the group reads them are then
        # counted too, even if the group never stored a batch of that partition.
        first_seen = {tp: marks[tp][0] for tp in assigned if tp not in stored}
        legacy = cluster_id and any(c is None for _, c in stored.values())
        if first_seen or legacy:
            with self.store.transaction() as con:
                if legacy:  # offsets stored before cluster ids were
                    con.execute(
                        "UPDATE consumer_offsets SET cluster_id = ? "
                        "WHERE consumer_group = ? AND cluster_id IS NULL",
                        [cluster_id, self.group],
                    )
                tables.save_offsets(con, self.group, first_seen, cluster_id)
        return {**first_seen, **verdict.start}

    def _due_offsets_check(self) -> bool:
        return self.ready.is_set() and (
            self._watch.suspect.is_set()
            or time.monotonic() >= self._next_offsets_check
            or self.checkpoint.fenced > 0
        )

    def _recheck_offsets(self) -> None:
        """The same check for the partitions held now (a cluster may have been replaced
        under a running group: no rebalance need follow)."""
        self._finish_in_flight()
        self.checkpoint.fenced = 0
        self._watch.suspect.clear()
        held = [(tp.topic, tp.partition) for tp in self._consumer.assignment()]
        try:
            self._check_offsets(self._consumer, held)
        except KafkaException as exc:  # the broker is away again: checked when it is back
            log.warning("%s: could not check offsets against the cluster: %s", self.group, exc)
            self._next_offsets_check = time.monotonic() + 5.0

    def _alert(
        self, rule: str, subject: str, value: float, threshold: float, severity: str, text: str
    ) -> None:
        if self.raise_alerts is None:
            return
        try:
            self.raise_alerts(rule, subject, value, threshold, severity, text)
        except Exception:
            log.exception("%s: could not record the alert (%s)", self.group, text)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        self._held = []
        # The batch in flight is stored before the partitions go to another member.
        self._finish_in_flight()
        # Never re-commit a partition another member now owns.
        self._unverified.clear()
        consumer.unassign()

    # --- broker loss ---------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():  # a fenced static member (see _rejoin)
            self._fatal = err
            return
        lost = err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)
        if lost and self._broker_down_since is None:
            self._outage_starts(time.monotonic())
            log.warning("%s: broker unreachable: %s", self.group, err.str())

    def _probe_when_idle(self) -> None:
        """Nothing polled for IDLE_PROBE_S: ask the broker for one topic's metadata. A
        host started just before its broker went away once never heard of the outage
        from librdkafka (no transport error reached the error callback, only session
        timeouts), kept waiting, and never exited past the grace period (CI's
        broker-fault drill: still running 71 s after the broker stopped, grace 5 s)."""
        now = time.monotonic()
        if self._broker_down_since is not None or now - self._heard_at < IDLE_PROBE_S:
            return
        if self._broker_answers():
            return
        # Counted from now, not from its last answer: one slow answer on a quiet topic
        # must not use up the grace period in one go.
        self._outage_starts(now)
        log.warning("%s: broker unreachable (no answer to a metadata request)", self.group)

    def _outage_starts(self, now: float) -> None:
        self._broker_down_since = now
        self._next_probe = now + self._probe_delay
        self._next_wedge_check = now + self.wedge_check_s
        self._answered_elsewhere_since = None

    def _broker_answers(self) -> bool:
        """One metadata request for one of our topics, answered within a second."""
        try:
            self._consumer.list_topics(self.handler.topics()[0], timeout=1.0)
        except KafkaException as exc:
            self._probe_error = exc.args[0].str() if exc.args else str(exc)
            return False
        self._heard_at = time.monotonic()
        return True

    @property
    def broker_down(self) -> bool:
        return self._broker_down_since is not None

    def _broker_still_down(self) -> bool:
        """Probe with backoff; True once the outage outlasted the grace period."""
        assert self._broker_down_since is not None
        t = time.monotonic()
        if t >= self._next_probe:
            if self._broker_answers():
                log.info("%s: broker reachable again", self.group)
                self._broker_down_since = None
                self._probe_delay = 0.5
                self._next_offsets_check = 0.0  # maybe another cluster behind the address
                return False
            self._probe_delay = min(self._probe_delay * 2, 5.0)
            self._next_probe = time.monotonic() + self._probe_delay
            if self._wedged():
                return False
        down_since = self._broker_down_since
        if down_since is not None and time.monotonic() - down_since > self.settings.broker_grace_s:
            log.error(
                "%s: broker unreachable for more than %.0fs; shutting down",
                self.group,
                self.settings.broker_grace_s,
            )
            self._record_broker_lost()
            return True
        return False

    def _wedged(self) -> bool:
        """Every ``wedge_check_s`` of an outage: does a new client reach the cluster that
        this consumer has had no answer from? Once that has held for ``wedged_after_s``,
        this consumer is replaced (True).

        CI saw a cluster replaced behind the same address (the runbook's old recovery
        step) while the group's coordinator was unreachable: the test's producer and the
        host's publisher reached the new cluster within seconds, the consumer's own
        metadata requests got no answer for the whole 120 s grace, and the host exited
        "broker unreachable" (3) instead of "stored offsets refused" (6). A new consumer
        resumes from the stored offsets, and its assignment checks them against the
        cluster (kafka/offsets.py)."""
        now = time.monotonic()
        if self._broker_down_since is None or now < self._next_wedge_check:
            return False
        self._next_wedge_check = now + self.wedge_check_s
        log.warning(
            "%s: broker still unreachable after %.0fs (%s)",
            self.group,
            now - self._broker_down_since,
            self._probe_error or "no answer",
        )
        if not answers_a_new_client(self.settings, self.handler.topics()[0], timeout=2.0):
            self._answered_elsewhere_since = None  # away for everyone: an outage
            return False
        if self._answered_elsewhere_since is None:
            self._answered_elsewhere_since = now
        answered_for = now - self._answered_elsewhere_since
        if answered_for < self.wedged_after_s:
            return False
        self._answered_elsewhere_since = None
        self._replace_consumer(
            f"the cluster has answered new clients for {answered_for:.0f}s but not this "
            "consumer; replacing it"
        )
        self._next_probe = time.monotonic() + self._probe_delay
        return True

    def _record_broker_lost(self) -> None:
        with self.store.transaction() as con:
            tables.insert(con, "health_signals", [self._signal("broker_reachable", 0.0)])

    # --- the batch ---------------------------------------------------------------------

    def _records(self, messages: list[Any]) -> list[Any]:
        """The polled records without the errors among them, which are logged. A fatal
        consumer error (a fenced static member) comes this way as code _FATAL, its
        fatal() flag unset, not through the error callback: noted for _rejoin."""
        data = [m for m in messages if m.error() is None]
        if len(data) != len(messages):
            for m in messages:
                err = m.error()
                if err is None or err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal() or err.code() == KafkaError._FATAL:
                    self._fatal = self._fatal or err
                else:
                    log.warning("%s: consume error: %s", self.group, err.str())
        return data

    def _batch(self, data: list[Any]) -> Batch:
        batch = Batch.decode(
            [m.topic() for m in data],
            [m.partition() for m in data],
            [m.offset() for m in data],
            [m.key() for m in data],
            [m.value() for m in data],
            [m.timestamp()[1] for m in data],
        )
        batch.cluster_id = self.checkpoint.cluster_id or ""
        return batch

    # --- side outputs --------------------------------------------------------------------

    def _send_dead_letters(self, dead: list[DeadLetter]) -> None:
        if not dead:
            return
        if self.metrics is not None:
            self.metrics.observe_dead_letters(self.group, [d.topic for d in dead])
        for d in dead:
            headers = [
                ("error_class", d.error_class.encode()),
                ("error_message", d.error_message.encode()[:1000]),
                ("original_topic", d.topic.encode()),
                ("original_partition", str(d.partition).encode()),
                ("original_offset", str(d.offset).encode()),
                ("consumer_group", self.group.encode()),
            ]
            value = d.value or b""
            if len(value) > DLQ_MAX_VALUE_BYTES:
                # Kafka accepted it once, but our producer's limit may be lower: keep the
                # head here (dead_letters keeps every byte) rather than fail the batch.
                headers += [("truncated_from", str(len(value)).encode())]
                value = value[:DLQ_MAX_VALUE_BYTES]
            try:
                self.publisher.send_async(
                    self.settings.topic_dlq, value, key=d.key, headers=headers
                )
            except KafkaException as exc:
                log.error(
                    "%s: dead letter %s[%d]@%d not sent to the DLQ topic (%s); it is "
                    "still stored in dead_letters",
                    self.group,
                    d.topic,
                    d.partition,
                    d.offset,
                    exc,
                )
        # At-least-once into the DLQ topic (its headers identify duplicates); the
        # dead_letters table is exactly-once with the batch.
        remaining = self.publisher.flush(5.0)
        if remaining:
            log.warning("%s: %d dead letters not yet acknowledged by Kafka", self.group, remaining)

    def _commit_to_kafka(self, next_offsets: dict[tuple[str, int], int]) -> None:
        sent = time.monotonic()
        self._unverified.update({tp: (offset, sent) for tp, offset in next_offsets.items()})
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # informational only: DuckDB holds the truth
            log.debug("%s: Kafka commit failed: %s", self.group, exc)

    def _verify_commits(self) -> None:
        """Every COMMIT_CHECK_S, read back from Kafka the committed offsets of the
        partitions committed since the last check, and commit again where Kafka holds
        less than what was stored. Around a node loss that moved the group's coordinator
        a commit can be lost (seen in the node-loss drill: Kafka one offset behind DuckDB
        after the stream, the commit retried by librdkafka as "Operation in progress"
        while the coordinator moved, no failure reported), and once the stream stops
        nothing else commits that partition: Kafka's lag (the monitor's, the operator's
        tools') would stay behind for good. Reading back trusts no callback."""
        if not self._unverified or time.monotonic() < self._next_commit_check:
            return
        self._next_commit_check = time.monotonic() + COMMIT_CHECK_S
        held = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for key in set(self._unverified) - held:
            del self._unverified[key]
        asked = [TopicPartition(t, p) for t, p in self._unverified]
        if not asked:
            return
        try:
            answer = self._consumer.committed(asked, timeout=1.0)
        except KafkaException as exc:  # the coordinator is away: at the next check
            log.debug("%s: could not read committed offsets: %s", self.group, exc)
            return
        behind = {}
        settled = time.monotonic() - 1.0  # a commit sent since may still be on its way
        for tp in answer:
            key = (tp.topic, tp.partition)
            stored, sent = self._unverified[key]
            if tp.error is None and tp.offset >= stored:
                del self._unverified[key]
            elif sent < settled:
                behind[key] = stored
        if behind:
            log.info(
                "%s: Kafka holds older committed offsets than stored for %d partition(s); "
                "committing them again",
                self.group,
                len(behind),
            )
            self._commit_to_kafka(behind)

    def _signal(self, metric: str, value: float) -> dict[str, Any]:
        return {
            "observed_at": now(),
            "source": f"consumer:{self._client_id}",
            "consumer_group": self.group,
            "topic": None,
            "partition": None,
            "metric": metric,
            "value": float(value),
        }

    def _signals(self, force: bool = False) -> Tables:
        """The loop's counters as ``health_signals`` columns, about once a second."""
        if not force and time.monotonic() - self._last_signals < SIGNAL_INTERVAL_S:
            return {}
        self._last_signals = time.monotonic()
        counts = self.checkpoint.counters.take()
        if not any(counts.values()):
            return {}
        rows = [self._signal(k, v) for k, v in counts.items()]
        return {"health_signals": {name: [r[name] for r in rows] for name in rows[0]}}

    def _maybe_flush_signals(self, force: bool = False) -> None:
        signals = self._signals(force)
        if not signals:
            return
        try:
            with self.store.transaction() as con:
                tables.insert_columns(con, "health_signals", signals["health_signals"])
        except Exception as exc:
            if not is_store_failure(exc):
                raise
            # Samples, not data: an idle group does not stop over them. A failing store
            # stops it at its next batch, after the retries.
            log.warning("%s: health signals not stored (store failure): %s", self.group, exc)
