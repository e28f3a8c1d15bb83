"""Stored offsets checked against the cluster, before a group resumes from them.

DuckDB holds each group's next offsets (see kafka/consumer.py), so a consumer never asks
Kafka where to resume. That makes a stale store dangerous in two ways, both silent
before this check:

* the cluster was replaced (its data wiped, or another cluster behind the same address):
  the stored offsets point past the new partitions' ends, or at other messages — resuming
  would skip every new event. The store records the cluster id with the offsets, and
  a different id or an offset above the high watermark stops the group with a message
  naming the fix.
* Kafka's retention deleted messages the group never read: the stored offset is below
  the low watermark. Those messages are gone; the group says how many, and continues
  from the low watermark.

:func:`assess` is the pure decision (unit-tested without a broker);
:func:`read_positions` asks the cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from horizons_platform.kafka.admin import watermarks

TP = tuple[str, int]

# The alerts a group raises when it checks its offsets (health rules of their own: events,
# not measurements, so no monitor evaluation resolves them).
OFFSETS_INVALID = "offsets_invalid"
MESSAGES_LOST = "messages_lost"


@dataclass(frozen=True)
class Loss:
    topic: str
    partition: int
    stored: int
    low: int

    @property
    def count(self) -> int:
        return self.low - self.stored


@dataclass
class Assessment:
    start: dict[TP, int] = field(default_factory=dict)  # where to resume (stored ones only)
    refused: list[str] = field(default_factory=list)  # why the group must not resume
    lost: list[Loss] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


def reset_hint(group: str) -> str:
    return (
        f"if the cluster's current data is what this group should read, run "
        f"`horizons offsets reset --group {group} --to earliest` (or --to latest to skip "
        f"it), then start the consumers again; `horizons offsets show` lists them"
    )


def assess(
    group: str,
    assigned: list[TP],
    stored: dict[TP, tuple[int, str | None]],
    cluster_id: str | None,
    marks: dict[TP, tuple[int, int]],
) -> Assessment:
    """Where ``group`` may resume on ``assigned`` partitions, given its ``stored``
    (next offset, cluster id) per partition, the cluster's id and (low, high) marks."""
    out = Assessment()
    foreign = sorted(
        {c for tp in assigned if tp in stored and (c := stored[tp][1]) and c != cluster_id}
    )
    if foreign and cluster_id:
        out.refused.append(
            f"group {group}: offsets stored for Kafka cluster {', '.join(foreign)}, but the "
            f"broker is cluster {cluster_id} (replaced or a different cluster): resuming "
            "would skip or repeat messages"
        )
    for tp in sorted(assigned):
        if tp not in stored:
            continue  # never consumed: from the beginning, by design
        offset = stored[tp][0]
        low, high = marks[tp]
        if offset > high:
            out.refused.append(
                f"group {group}: {tp[0]}[{tp[1]}] stored next offset {offset} is above the "
                f"partition's high watermark {high} (topic recreated or cluster replaced): "
                f"resuming would skip the next {offset - high} new messages"
            )
        elif offset < low:
            out.lost.append(Loss(tp[0], tp[1], offset, low))
            out.start[tp] = low
        else:
            out.start[tp] = offset
    if out.refused:
        out.refused.append(reset_hint(group))
    return out


def read_positions(
    consumer: Consumer, partitions: list[TP], timeout: float = 10.0
) -> tuple[str | None, dict[TP, tuple[int, int]]]:
    """The cluster's id and each of ``partitions``' (low, high) watermarks."""
    deadline = time.monotonic() + timeout
    cluster_id = consumer.list_topics(timeout=timeout).cluster_id
    marks = {(t, p): watermarks(consumer, TopicPartition(t, p), deadline) for t, p in partitions}
    return cluster_id, marks
