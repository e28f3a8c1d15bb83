"""A running group's stored offsets, watched against the cluster off the loop's thread.

The consumer loop checks its stored offsets against the cluster (kafka/offsets.py) on
every assignment, after a broker outage and when the store fenced records. A cluster can
also be replaced, or Kafka's retention overtake a slow group, under a group that noticed
nothing; so the offsets are checked periodically too. Done on the loop's thread, that
check was a metadata request and two watermark requests per partition held: the
compliance-auditor's 18 partitions stopped its polling for long enough every 30 s to
set its produce → stored p99 (370 ms against 171 without it at 1,000 events/s,
`horizons bench latency`).

So the periodic check runs here, on a thread of its own with its own admin client,
and only *detects*: when it sees anything off (another cluster id, an offset above
the high watermark or below the low one) it raises :attr:`OffsetsWatch.suspect`, and
the loop runs its own check — the same one as on an assignment — which decides and
acts. A suspicion that the loop's check does not confirm costs one check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from horizons_platform.kafka import offsets
from horizons_platform.kafka.admin import admin_client, list_watermarks
from horizons_platform.kafka.offsets import TP
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0


class OffsetsWatch:
    def __init__(
        self,
        settings: Settings,
        group: str,
        store: StoreBase,
        held: Callable[[], list[TP]],
        interval_s: float,
    ) -> None:
        self.group = group
        self.store = store
        self.held = held  # the partitions the loop holds now (read, never changed here)
        self.interval_s = interval_s
        self.suspect = threading.Event()  # set: the loop should check its offsets now
        self._settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> OffsetsWatch:
        self._thread = threading.Thread(target=self._run, name=f"offsets-{self.group}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the watch. A request in flight to a broker that is gone is not waited
        out (a stopping group must not wait on it): the thread ends after its timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def _run(self) -> None:
        admin = admin_client(self._settings)
        while not self._stop.wait(self.interval_s):
            try:
                reason = self.check(admin)
            except (KafkaException, TimeoutError) as exc:
                # The broker is away: the loop notices that itself, and checks its
                # offsets when the broker answers again.
                log.debug("%s: offsets watch could not reach the cluster: %s", self.group, exc)
                continue
            except Exception:
                log.exception("%s: offsets watch failed; the loop checks instead", self.group)
                reason = "the watch itself failed"
            if reason:
                log.warning(
                    "%s: stored offsets look off (%s); the loop checks them", self.group, reason
                )
                self.suspect.set()

    def check(self, admin: AdminClient) -> str | None:
        """Why the stored offsets of the held partitions need the loop's check, or None.
        The store is read before the cluster: an append-only partition's high watermark
        only grows, so an offset stored before it was read is never above it by race."""
        held = self.held()
        if not held:
            return None
        with self.store.reader() as con:
            stored = tables.stored_positions(con, self.group)
        held = [tp for tp in held if tp in stored]
        if not held:
            return None
        cluster_id = admin.list_topics(timeout=REQUEST_TIMEOUT_S).cluster_id
        marks = list_watermarks(admin, held, REQUEST_TIMEOUT_S)
        verdict = offsets.assess(self.group, held, stored, cluster_id, marks)
        if not verdict.ok:
            return verdict.refused[0]
        if verdict.lost:
            loss = verdict.lost[0]
            return f"{loss.topic}[{loss.partition}] stored {loss.stored} < low {loss.low}"
        return None
