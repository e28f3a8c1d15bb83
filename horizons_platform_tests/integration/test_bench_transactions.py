"""`horizons bench transactions` times each service's real batch path, and says so when a
batch did not go through it (dead-lettered or failed) instead of timing that;
`horizons bench checkpoint` times a checkpoint of that path's rows by store size;
`horizons bench outbox` sends what it queued (it once queued rows no claim could find)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from horizons_bench import checkpoint, outbox, transactions
from horizons_bench.harness import BenchContext, Progress
from horizons_platform.services.registry import HANDLERS
from horizons_platform.settings import Settings


@pytest.fixture
def ctx(kafka_bootstrap: str, tmp_path: Path) -> Iterator[BenchContext]:
    base = Settings(kafka_bootstrap=kafka_bootstrap, var_dir=tmp_path / "var")  # type: ignore[call-arg]
    context = BenchContext(
        base=base, name="transactions", run_dir=tmp_path / "bench", bootstrap=kafka_bootstrap,
        progress=Progress(quiet=True),
    )  # fmt: skip
    yield context
    context.cleanup()


def test_every_service_gets_a_figure_from_batches_it_stored(ctx: BenchContext) -> None:
    result = transactions.run(ctx, jobs=200, batch=40, history=20_000)
    assert result.passed, result.notes
    figures = {f.name: f for f in result.figures}
    for group in HANDLERS:
        figure = figures[f"{group}: one batch's transaction"]
        assert figure.value is not None and figure.value > 0
        assert "batches of 40" in figure.note


def test_batches_that_end_in_dead_letters_fail_the_run(
    ctx: BenchContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every event invalid: each batch ends in dead letters, not in the service's tables.
    monkeypatch.setattr(transactions.Batch, "decode", _all_invalid(transactions.Batch.decode))
    result = transactions.run(ctx, jobs=20, batch=40, history=0)
    assert not result.passed
    assert any("dead letters" in note for note in result.notes)


def _all_invalid(decode):  # type: ignore[no-untyped-def]
    def wrapped(topics, partitions, offsets, keys, values, timestamps):  # type: ignore[no-untyped-def]
        return decode(topics, partitions, offsets, keys, [b"{" for _ in values], timestamps)

    return wrapped


def test_the_checkpoint_bench_times_one_checkpoint_per_store_size(ctx: BenchContext) -> None:
    result = checkpoint.run(ctx, events=800, sizes=(4_000,), batch=200)
    assert result.passed, result.notes
    fresh, grown = result.figures
    assert "0 stored before" in fresh.name
    found = re.search(r"([\d,]+) stored before", grown.name)
    assert found is not None and int(found.group(1).replace(",", "")) >= 4_000
    for figure in (fresh, grown):
        assert figure.value is not None and figure.value > 0
        assert "MB of WAL" in figure.note


def test_the_outbox_bench_sends_every_e_mail_it_queued(ctx: BenchContext) -> None:
    result = outbox.run(ctx, emails=300)
    figures = {f.name: f for f in result.figures}
    assert figures["not sent at the end"].value == 0
    rate = figures["e-mails sent"].value
    assert rate is not None and rate > 0
