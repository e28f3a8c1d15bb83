"""Progress of consumer groups, read from the broker: committed offsets vs end offsets.

The consumer loop commits each batch's offsets to Kafka right after the DuckDB
transaction that stored the batch, so a committed offset seen here is already durable in
DuckDB (the check is conservative by the commit's round trip). Measuring through the
broker keeps the benchmark off the DuckDB file, whose single lock the consumers need:
polling the store would slow down the very thing being measured. Final counts are read
from DuckDB once the consumers have stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from horizons_platform.kafka.admin import end_offsets
from horizons_platform.settings import Settings

TP = tuple[str, int]
T = TypeVar("T")
RETRY_S = 60.0


def _retrying(call: Callable[[], T], reset: Callable[[], None], deadline_s: float = RETRY_S) -> T:
    """Retry through the errors a broker restart produces (fenced leader epochs,
    coordinator loading, transport errors) with a fresh client each time: librdkafka's
    admin client keeps asking with the leader epoch it cached before the restart."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
            reset()


@dataclass(frozen=True)
class GroupState:
    done: int  # messages committed
    total: int  # messages in the group's topics (end offsets)

    @property
    def lag(self) -> int:
        return max(0, self.total - self.done)

    @property
    def caught_up(self) -> bool:
        return self.total > 0 and self.done >= self.total


class OffsetProbe:
    """End offsets through the admin API; committed offsets through a consumer of each
    group that never joins it. Not AdminClient.list_consumer_group_offsets: in librdkafka
    2.16 its NOT_COORDINATOR path dereferences a NULL consumer group and segfaults the
    process (librdkafka#5040) — exactly what a broker restart provokes."""

    def __init__(self, settings: Settings, groups: dict[str, list[str]]) -> None:
        self.settings = settings
        self.groups = groups
        self.admin = AdminClient(settings.kafka_config())
        self._readers: dict[str, Consumer] = {}
        topics = sorted({t for ts in groups.values() for t in ts})
        meta = self.admin.list_topics(timeout=30).topics
        self.partitions: dict[str, list[TP]] = {
            t: [(t, p) for p in sorted(meta[t].partitions)] for t in topics if t in meta
        }

    def _new_client(self) -> None:
        self.admin = AdminClient(self.settings.kafka_config())
        self._readers.clear()

    def _reader(self, group: str) -> Consumer:
        if group not in self._readers:
            conf = {"group.id": group, "enable.auto.commit": False}
            self._readers[group] = Consumer(self.settings.kafka_config(**conf))
        return self._readers[group]

    def tps(self, group: str) -> list[TP]:
        return [tp for t in self.groups[group] for tp in self.partitions.get(t, [])]

    def end_offsets(self, timeout: float = 10.0) -> dict[TP, int]:
        return _retrying(lambda: self._end_offsets(timeout), self._new_client)

    def _end_offsets(self, timeout: float) -> dict[TP, int]:
        return end_offsets(self.settings, list(self.partitions), timeout, admin=self.admin)

    def committed(self, group: str, timeout: float = 10.0) -> dict[TP, int]:
        """Committed offsets of ``group`` on its bench topics (0 where none yet)."""
        return _retrying(lambda: self._committed(group, timeout), self._new_client)

    def _committed(self, group: str, timeout: float) -> dict[TP, int]:
        tps = [TopicPartition(t, p) for t, p in self.tps(group)]
        out = {}
        for tp in self._reader(group).committed(tps, timeout=timeout):
            valid = tp.offset != OFFSET_INVALID and tp.offset >= 0 and tp.error is None
            out[(tp.topic, tp.partition)] = tp.offset if valid else 0
        return out

    def snapshot(self, groups: list[str] | None = None) -> dict[str, GroupState]:
        ends = self.end_offsets()
        states = {}
        for group in groups or list(self.groups):
            committed = self.committed(group)
            tps = self.tps(group)
            states[group] = GroupState(
                done=sum(min(committed.get(tp, 0), ends.get(tp, 0)) for tp in tps),
                total=sum(ends.get(tp, 0) for tp in tps),
            )
        return states

    def reset(self, group: str, timeout: float = 30.0) -> None:
        """Set ``group``'s Kafka offsets on the bench topics back to 0.

        Only the watcher reads them (the loop resumes from DuckDB, which is fresh per
        run); needed when one group name is measured twice over the same topics. The
        group must have no live members.
        """
        tps = [TopicPartition(t, p, 0) for t, p in self.tps(group)]
        deadline = time.monotonic() + timeout
        while True:
            try:
                # A commit from outside the group: accepted while it has no members.
                self._reader(group).commit(offsets=tps, asynchronous=False)
                return
            except Exception:
                # The last member's LeaveGroup may still be in flight.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
