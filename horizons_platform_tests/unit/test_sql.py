"""SQL literals and inlined parameters for Quack clients: round trips through DuckDB."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizons_platform.store.sql import inline, literal, write_statements

VALUES = [
    None,
    True,
    -3,
    2.5,
    Decimal("1.25"),
    "it's; DROP TABLE jobs; --",
    b"\x00\xffraw",
    datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5),
    date(2026, 1, 2),
    timedelta(days=1, seconds=2, microseconds=3),
    UUID("12345678-1234-5678-1234-567812345678"),
    [1, 2, 3],
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_a_literal_reads_back_as_the_same_value(value: object) -> None:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    assert con.execute(f"SELECT {literal(value)}").fetchone()[0] == value  # type: ignore[index]


_CON = duckdb.connect()


@settings(deadline=None)  # timing varies with the machine's load; the property does not
@given(st.text())
def test_any_text_survives_quoting(text: str) -> None:
    if "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return  # not representable as DuckDB VARCHAR either way
    assert _CON.execute(f"SELECT {literal(text)}").fetchone()[0] == text  # type: ignore[index]


def test_placeholders_in_strings_comments_and_identifiers_are_left_alone() -> None:
    sql = "SELECT '?', \"a?\" , ? /* ? */ -- ?\n, $2"
    assert inline(sql, ["x", 7]) == "SELECT '?', \"a?\" , 'x' /* ? */ -- ?\n, 7"


def test_a_parameter_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="more placeholders"):
        inline("SELECT ?, ?", [1])
    with pytest.raises(ValueError, match="2 parameters given, 1"):
        inline("SELECT ?", [1, 2])


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("SELECT 1", []),
        ("WITH x AS (SELECT 1) SELECT * FROM x", []),
        ("EXPLAIN SELECT 1", []),
        ("DESCRIBE jobs", []),
        ("DELETE FROM jobs", ["DELETE"]),
        ("SELECT 1; DROP TABLE jobs", ["DROP"]),
        ("COPY jobs TO '/tmp/x.csv'", ["COPY"]),
        ("UPDATE jobs SET status = 'x'", ["UPDATE"]),
        # EXPLAIN ANALYZE runs what it explains; plain EXPLAIN is refused alike.
        ("EXPLAIN ANALYZE DELETE FROM jobs", ["DELETE"]),
        ("explain analyse select 1", []),
        ("EXPLAIN DELETE FROM jobs", ["DELETE"]),
        ("EXPLAIN (FORMAT json) UPDATE jobs SET status = 'x'", ["UPDATE"]),
        ("EXPLAIN (FORMAT json) SELECT 1", []),
    ],
)
def test_write_statements_are_named(sql: str, writes: list[str]) -> None:
    assert write_statements(sql) == writes
