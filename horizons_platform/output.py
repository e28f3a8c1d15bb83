"""Query results for people and scripts: a table, CSV or JSON, streamed in batches.

Nothing here holds a whole result: rows are fetched ``BATCH`` at a time, so a query that
returns millions of rows prints as it arrives, in constant memory.
"""

from __future__ import annotations

import csv
import json
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


def _text(value: Any) -> str:
    return "" if value is None else str(value)


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
            writer.writerow(["" if v is None else v for v in row])
            n += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            if limit and n == limit:
                truncated = True
                break
            out.write(",\n" if n else "\n")
            out.write(json.dumps(dict(zip(columns, row, strict=True)), default=str))
            n += 1
        out.write("\n]\n" if n else "]\n")
    else:
        # Widths come from the first batch; later rows are cut to them.
        head: list[list[str]] = []
        for row in rows:
            head.append([_text(v) for v in row])
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
                out.write(line([_text(v) for v in row]).rstrip() + "\n")
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
