"""The decision behind resuming from stored offsets (kafka/offsets.py), without a broker."""

from __future__ import annotations

from horizons_platform.kafka.offsets import Loss, assess

T = "job-lifecycle"


def test_offsets_within_the_watermarks_resume_where_they_are() -> None:
    verdict = assess(
        "g",
        [(T, 0), (T, 1)],
        {(T, 0): (5, "c1"), (T, 1): (0, None)},
        "c1",
        {(T, 0): (0, 9), (T, 1): (0, 0)},
    )
    assert verdict.ok and verdict.start == {(T, 0): 5, (T, 1): 0} and not verdict.lost


def test_a_partition_never_consumed_is_not_judged() -> None:
    verdict = assess("g", [(T, 0)], {}, "c1", {})
    assert verdict.ok and verdict.start == {}


def test_an_offset_above_the_high_watermark_stops_the_group_with_the_fix() -> None:
    verdict = assess(
        "g",
        [(T, 0), (T, 1)],
        {(T, 0): (30, None), (T, 1): (2, None)},
        "c2",
        {(T, 0): (0, 4), (T, 1): (0, 7)},
    )
    assert not verdict.ok
    text = "\n".join(verdict.refused)
    assert (
        "job-lifecycle[0] stored next offset 30 is above the partition's high watermark 4" in text
    )
    assert "horizons offsets reset --group g --to earliest" in text


def test_another_cluster_id_stops_the_group_even_when_offsets_look_plausible() -> None:
    verdict = assess("g", [(T, 0)], {(T, 0): (3, "old-cluster")}, "new-cluster", {(T, 0): (0, 50)})
    assert not verdict.ok
    assert "cluster old-cluster, but the broker is cluster new-cluster" in verdict.refused[0]


def test_an_offset_below_the_low_watermark_counts_the_loss_and_resumes_at_the_low_mark() -> None:
    verdict = assess("g", [(T, 0)], {(T, 0): (10, "c1")}, "c1", {(T, 0): (25, 40)})
    assert verdict.ok
    assert verdict.lost == [Loss(T, 0, 10, 25)] and verdict.lost[0].count == 15
    assert verdict.start == {(T, 0): 25}
