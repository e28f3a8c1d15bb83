"""`horizons offsets show|reset`: the offsets stored in DuckDB, next to the cluster's.

DuckDB holds where each group resumes (kafka/consumer.py); Kafka's own committed
offsets only mirror it. So a reset happens here, in the store, for a group that is not
running — and it is audited like every other action.
"""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient

from horizons_platform.kafka import offsets
from horizons_platform.kafka.admin import one_shot_config
from horizons_platform.kafka.producer import Publisher
from horizons_platform.runtime.monitor import apply_evaluations
from horizons_platform.runtime.publications import enqueue_audit, publish_now
from horizons_platform.services import health_rules
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreBase

TP = tuple[str, int]


class OffsetsError(RuntimeError):
    """The reset cannot be done as asked (unknown group, offset out of range, group live)."""


@dataclass(frozen=True)
class Position:
    group: str
    topic: str
    partition: int
    stored: int | None
    stored_cluster: str | None
    low: int
    high: int
    cluster: str | None

    @property
    def lag(self) -> int | None:
        return None if self.stored is None else max(0, self.high - max(self.stored, self.low))

    @property
    def state(self) -> str:
        if self.stored is None:
            return "not consumed yet"
        if self.stored_cluster and self.cluster and self.stored_cluster != self.cluster:
            return f"OTHER CLUSTER ({self.stored_cluster})"
        if self.stored > self.high:
            return "ABOVE HIGH WATERMARK"
        if self.stored < self.low:
            return f"{self.low - self.stored} deleted unread"
        return "ok"


def _consumer(settings: Settings) -> Consumer:
    # A cluster that does not answer is the command's one-line error (cli._describe).
    return Consumer(one_shot_config(settings, **{"group.id": "horizons-offsets-cli"}))


def positions(settings: Settings, store: StoreBase, group: str | None = None) -> list[Position]:
    """Every partition of every group's topics (or ``group``'s), stored vs the cluster."""
    topics = group_topics(settings)
    if group is not None and group not in topics:
        raise OffsetsError(f"unknown group {group!r}; groups: {', '.join(topics)}")
    groups = [group] if group else list(topics)
    with store.reader() as con:
        stored = {g: tables.stored_positions(con, g) for g in groups}
    consumer = _consumer(settings)
    try:
        meta = consumer.list_topics(timeout=10).topics
        wanted = sorted(
            {(t, p) for g in groups for t in topics[g] if t in meta for p in meta[t].partitions}
        )
        cluster, marks = offsets.read_positions(consumer, wanted)
    finally:
        consumer.close()
    out = []
    for g in groups:
        for t in topics[g]:
            for tp in [tp for tp in wanted if tp[0] == t]:
                offset, cid = stored[g].get(tp, (None, None))
                low, high = marks[tp]
                out.append(Position(g, t, tp[1], offset, cid, low, high, cluster))
    return out


@dataclass(frozen=True)
class ResetPlan:
    group: str
    to: str
    cluster: str | None
    moves: list[tuple[Position, int]]  # (where it is, where it goes)


def plan_reset(
    settings: Settings,
    store: StoreBase,
    group: str,
    to: str,
    topic: str | None = None,
    partition: int | None = None,
) -> ResetPlan:
    chosen = [
        pos
        for pos in positions(settings, store, group)
        if (topic is None or pos.topic == topic)
        and (partition is None or pos.partition == partition)
    ]
    if not chosen:
        raise OffsetsError(
            f"group {group} reads no partition matching topic={topic} partition={partition}"
        )
    moves = []
    for pos in chosen:
        if to == "earliest":
            target = pos.low
        elif to == "latest":
            target = pos.high
        else:
            try:
                target = int(to)
            except ValueError:
                raise OffsetsError(
                    f"--to takes earliest, latest or an offset, not {to!r}"
                ) from None
            if not pos.low <= target <= pos.high:
                raise OffsetsError(
                    f"offset {target} is outside {pos.topic}[{pos.partition}]'s range "
                    f"{pos.low}..{pos.high}"
                )
        moves.append((pos, target))
    return ResetPlan(group, to, chosen[0].cluster, moves)


def live_members(settings: Settings, group: str, wait_s: float = 0.0) -> int:
    """Members of ``group`` in Kafka, waiting up to ``wait_s`` for it to empty (a static
    member that stopped stays until its session times out)."""
    admin = AdminClient(one_shot_config(settings))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except KafkaException:
            return 0  # no such group on this cluster yet
        if not desc.members or time.monotonic() >= deadline:
            return len(desc.members)
        time.sleep(0.5)


def apply_reset(
    settings: Settings,
    store: StoreBase,
    plan: ResetPlan,
    publisher: Publisher | None = None,
    actor: str | None = None,
) -> None:
    """Write the plan's offsets (with the cluster id), audit it, close the group's
    offsets alert — in one transaction; then publish the audit record."""
    actor = actor or f"{getpass.getuser()}@{socket.gethostname()} (horizons offsets reset)"
    now = datetime.now(UTC)
    rows = [
        {
            "consumer_group": plan.group,
            "topic": pos.topic,
            "partition": pos.partition,
            "next_offset": target,
            "updated_at": now,
            "cluster_id": plan.cluster,
        }
        for pos, target in plan.moves
    ]
    details: dict[str, Any] = {
        "group": plan.group,
        "to": plan.to,
        "cluster_id": plan.cluster,
        "partitions": {
            f"{pos.topic}[{pos.partition}]": {"from": pos.stored, "to": target}
            for pos, target in plan.moves
        },
    }
    with store.transaction() as con:
        for row in rows:
            con.execute(
                "DELETE FROM consumer_offsets "
                'WHERE consumer_group = ? AND topic = ? AND "partition" = ?',
                [row["consumer_group"], row["topic"], row["partition"]],
            )
        tables.insert(con, "consumer_offsets", rows)
        record = enqueue_audit(
            con,
            settings,
            actor,
            "offsets.reset",
            details,
            producer=f"horizons-cli@{socket.gethostname()}",
        )
    publish_now(store, publisher, [record])
    # The alert the group raised when it refused its offsets is resolved by this reset.
    apply_evaluations(
        settings,
        store,
        publisher,
        [
            health_rules.Evaluation(
                offsets.OFFSETS_INVALID,
                plan.group,
                0.0,
                0.0,
                "critical",
                False,
                f"group {plan.group}: offsets reset to {plan.to}",
            )
        ],
        actor=actor,
    )
