"""The idempotent publisher every service uses to write to Kafka."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from horizons_platform.events import Envelope, encode, headers_for
from horizons_platform.settings import Settings

Headers = list[tuple[str, bytes]]

log = logging.getLogger(__name__)

# How often a producer asks which cluster it talks to (one metadata request); after a
# failed check (broker away), sooner.
CLUSTER_CHECK_S = 1.0
CLUSTER_RECHECK_S = 0.2


class DeliveryError(RuntimeError):
    """Kafka did not acknowledge a message (broker down past the timeout, rejected, …)."""


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int


class Publisher:
    """``acks=all`` + idempotence: a retried send is never written twice by the broker."""

    def __init__(self, settings: Settings, *, delivery_timeout_s: float = 15.0, **extra: object):
        self.settings = settings
        self.delivery_timeout_s = delivery_timeout_s
        conf = settings.kafka_config(
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "client.id": f"horizons-{settings.producer_name}",
            }
        )
        conf.update(extra)
        conf["error_cb"] = self._on_error
        self._conf = conf
        self._fatal: KafkaError | None = None
        self._producer = Producer(conf)
        self._lock = threading.Lock()
        self._cluster_id: str | None = None  # where this producer's idempotence id is from
        self._next_cluster_check = 0.0
        self._check_cluster()  # an idle producer's PID is from the cluster of its start

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err

    def _renew_if_fatal(self) -> None:
        """An idempotent producer's fatal error (e.g. OUT_OF_ORDER_SEQUENCE_NUMBER against
        a cluster replaced behind the address) makes it refuse every later message, and
        librdkafka's answer is a new producer: without one, a long-running host would
        never publish an alert or a dead letter again. What the old one had not delivered
        failed with the fatal error; the outboxes send it again."""
        fatal = self._fatal
        if fatal is not None:
            self._renew(f"fatal error ({fatal.str()})", lambda: self._fatal is not None)

    def _check_cluster(self) -> None:
        """A new producer when the cluster behind the address is not the one this
        producer got its idempotence id (PID) from. Brokers accept any sequence from a
        PID they have never seen, so an old producer writing on would plant its PID and
        sequences in the new cluster, which hands out PIDs from zero again: a fresh
        producer given the same PID later has its first messages refused as out of
        order, or acknowledged as "duplicates" and never written (reproduced with
        confluent-kafka 2.16 and Kafka 4.1: a silent loss). Checked before a send at
        most every CLUSTER_CHECK_S; librdkafka may still deliver what was queued while
        the broker was away, so this narrows the window rather than closing it."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_cluster_check:
                return
            self._next_cluster_check = now + CLUSTER_CHECK_S
            producer = self._producer
        try:
            current = producer.list_topics(timeout=1.0).cluster_id
        except KafkaException:
            self._next_cluster_check = time.monotonic() + CLUSTER_RECHECK_S
            return
        known = self._cluster_id
        if known is None or not current:
            self._cluster_id = self._cluster_id or current
        elif current != known:
            self._renew(
                f"the broker is now Kafka cluster {current}, not {known} (replaced)",
                lambda: self._producer is producer,
            )
            self._cluster_id = current

    def _renew(self, reason: str, still_needed: Callable[[], bool]) -> None:
        with self._lock:
            if not still_needed():  # another thread renewed it meanwhile
                return
            log.warning("producer: %s; starting a new producer", reason)
            self._fatal = None
            old, self._producer = self._producer, Producer(self._conf)
        old.purge()
        old.flush(0)

    def publish(self, topic: str, event: Envelope, key: str | None = None) -> Delivery:
        """Send one event and wait for the broker's acknowledgement."""
        key = key if key is not None else event.job_id
        return self.send(topic, encode(event), key=key, headers=headers_for(event))

    def send(
        self, topic: str, value: bytes, *, key: str | bytes | None, headers: Headers | None = None
    ) -> Delivery:
        done = threading.Event()
        outcome: list[Message | KafkaError] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            outcome.append(err if err is not None else msg)
            done.set()

        self.send_async(topic, value, key=key, headers=headers, on_delivery=on_delivery)
        if not self.await_reports(done.is_set):
            raise DeliveryError(
                f"no delivery report for {topic} after {self.delivery_timeout_s + 5:.0f}s"
            )
        result = outcome[0]
        if isinstance(result, KafkaError):
            raise DeliveryError(f"delivery to {topic} failed: {result.str()}")
        return Delivery(result.topic() or topic, result.partition() or 0, result.offset() or 0)

    def send_async(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: str | bytes | None,
        headers: Headers | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        self._renew_if_fatal()
        self._check_cluster()
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers,  # type: ignore[arg-type]  # the stub's list is invariant
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.1)

    def await_reports(
        self,
        settled: Callable[[], bool],
        stop: threading.Event | None = None,
        grace_s: float = 0.0,
    ) -> bool:
        """Serve delivery reports until ``settled()``; False if none settled in time.
        librdkafka reports every message within message.timeout.ms (the delivery
        timeout), so the wait is bounded by that plus slack; once ``stop`` is set, by
        ``grace_s`` more: a stopping host still hears a reachable broker (milliseconds),
        but does not wait out an unreachable one."""
        deadline = time.monotonic() + self.delivery_timeout_s + 5
        stopping = False
        while not settled():
            now = time.monotonic()
            if not stopping and stop is not None and stop.is_set():
                stopping, deadline = True, min(deadline, now + grace_s)
            if now >= deadline:
                return False
            self.poll(0.05)
        return True

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float | None = None) -> int:
        """Wait for outstanding messages; returns how many are still undelivered."""
        return self._producer.flush(self.delivery_timeout_s if timeout is None else timeout)
