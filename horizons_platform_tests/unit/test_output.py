"""Query output: formats, limits, streaming — against a real in-memory DuckDB cursor."""

from __future__ import annotations

import csv
import io
import json

import duckdb
import pytest

from horizons_platform.output import write_result


def _cursor(n: int) -> duckdb.DuckDBPyConnection:
    return duckdb.connect().execute(
        "SELECT range AS i, 'row ' || range AS label, NULL AS nothing FROM range(?)", [n]
    )


def test_table_stops_at_its_default_limit_and_says_so() -> None:
    out = io.StringIO()
    shown = write_result(_cursor(1000), "table", None, out)
    lines = out.getvalue().splitlines()
    assert shown.rows == 200 and shown.truncated and shown.limit == 200
    assert lines[0].split() == ["i", "label", "nothing"] and len(lines) == 202


def test_csv_and_json_print_every_row_by_default() -> None:
    out = io.StringIO()
    shown = write_result(_cursor(25_000), "csv", None, out)  # more than one fetch batch
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert not shown.truncated and shown.rows == 25_000 and len(rows) == 25_001
    assert rows[1] == ["0", "row 0", ""]
    out = io.StringIO()
    write_result(_cursor(3), "json", None, out)
    assert json.loads(out.getvalue()) == [
        {"i": i, "label": f"row {i}", "nothing": None} for i in range(3)
    ]


def test_an_explicit_limit_applies_to_every_format() -> None:
    for fmt in ("table", "csv", "json"):
        out = io.StringIO()
        shown = write_result(_cursor(10), fmt, 4, out)
        assert shown.rows == 4 and shown.truncated, fmt
    out = io.StringIO()
    assert write_result(_cursor(0), "json", None, out).rows == 0
    assert json.loads(out.getvalue()) == []


def test_blobs_read_as_duckdb_prints_them_and_json_has_no_nan() -> None:
    sql = (
        "SELECT from_hex('00ff4122275c') AS b, 'nan'::DOUBLE AS x, 'inf'::DOUBLE AS y, "
        "1.5::DOUBLE AS z, 'two\nlines' AS t"
    )
    duckdb_text = duckdb.connect().execute("SELECT from_hex('00ff4122275c')::VARCHAR").fetchone()
    assert duckdb_text is not None
    out = io.StringIO()
    write_result(duckdb.connect().execute(sql), "json", None, out)
    [row] = json.loads(out.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert row == {"b": duckdb_text[0], "x": None, "y": None, "z": 1.5, "t": "two\nlines"}
    out = io.StringIO()
    write_result(duckdb.connect().execute(sql), "csv", None, out)
    assert list(csv.reader(io.StringIO(out.getvalue())))[1][0] == duckdb_text[0]
    out = io.StringIO()
    write_result(duckdb.connect().execute(sql), "table", None, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "two\\nlines" in lines[2]  # one row, one line
