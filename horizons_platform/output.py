"""Query results for people and scripts: a table, CSV or JSON, streamed in batches.

Nothing here holds a whole result: rows are fetched ``BATCH`` at a time, so a query that
returns millions of rows prints as it arrives, in constant memory.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

BATCH = 10_000
TABLE_DEFAULT_LIMIT = 200
MAX_WIDTH = 60


@dataclass
class Shown:
    rows: int
    truncated: bool
    limit: int  # the limit applied (0: none)


def _rows(cursor: Any, limit: int | None) -> Iterator[tuple]:
    count = 0
    while batch := cursor.fetchmany(BATCH if not limit else min(BATCH, limit - count + 1)):
        for row in batch:
            yield row
            count += 1
            if limit and count > limit:
                return


_BLOB_PLAIN = frozenset(range(32, 127)) - {0x22, 0x27, 0x5C}


def blob_text(value: bytes | bytearray | memoryview) -> str:
    """A BLOB as DuckDB prints one (``blob::VARCHAR``): printable ASCII as is; quotes,
    the backslash and every other byte as ``\\xHH``."""
    return "".join(chr(b) if b in _BLOB_PLAIN else f"\\x{b:02X}" for b in bytes(value))


def _plain(value: Any) -> Any:
    """A value as text or JSON can carry it: BLOBs as DuckDB's text, non-finite floats
    (which JSON has no word for) as null."""
    if isinstance(value, bytes | bytearray | memoryview):
        return blob_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return blob_text(value)
    return str(value)


def _cell(value: Any) -> str:
    """A table cell: on one line, whatever the value holds."""
    return _text(value).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def write_result(cursor: Any, fmt: str, limit: int | None, out: TextIO) -> Shown:
    """Write an executed cursor's rows to ``out``; ``limit`` None means the format's default."""
    if limit is None:
        limit = TABLE_DEFAULT_LIMIT if fmt == "table" else 0
    columns = [d[0] for d in cursor.description] if cursor.description else []
    n, truncated = 0, False
    rows = _rows(cursor, limit)
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            if limit and n == limit:
                truncated = True
                break
            writer.writerow([_text(v) for v in row])
            n += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            if limit and n == limit:
                truncated = True
                break
            out.write(",\n" if n else "\n")
            record = {c: _plain(v) for c, v in zip(columns, row, strict=True)}
            out.write(json.dumps(record, default=str, allow_nan=False))
            n += 1
        out.write("\n]\n" if n else "]\n")
    else:
        # Widths come from the first batch; later rows are cut to them.
        head: list[list[str]] = []
        for row in rows:
            head.append([_cell(v) for v in row])
            if len(head) >= min(BATCH, limit or BATCH) + 1:
                break
        if limit and len(head) > limit:
            head, truncated = head[:limit], True
        widths = [
            min(MAX_WIDTH, max([len(c)] + [len(r[i]) for r in head])) for i, c in enumerate(columns)
        ]

        def line(values: list[str]) -> str:
            return "  ".join(v[:MAX_WIDTH].ljust(w) for v, w in zip(values, widths, strict=True))

        out.write(line(columns).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in head:
            out.write(line(r).rstrip() + "\n")
        n = len(head)
        if not truncated:
            for row in rows:
                if limit and n == limit:
                    truncated = True
                    break
                out.write(line([_cell(v) for v in row]).rstrip() + "\n")
                n += 1
    out.flush()
    return Shown(n, truncated, limit)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]], limit: int = 200) -> None:
    shown = [["" if v is None else str(v) for v in row] for row in rows[:limit]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(columns)]
    widths = [min(w, 60) for w in widths]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in shown:
        print("  ".join(v[:60].ljust(w) for v, w in zip(r, widths, strict=True)))
    more = f" (first {limit} shown)" if len(rows) > limit else ""
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
