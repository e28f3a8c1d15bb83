"""Pure SQL text helpers for the store's clients: literals, inlined parameters, read-only.

Quack 1.5.5 runs a client's statement on the owner through
``quack_query_by_name(catalog, sql)``, which takes SQL text and no parameters, so a
client inlines its parameters as literals here. Literals are built from Python values
(never from SQL fragments), with DuckDB's quoting rules: a single quote doubles, no
backslash escapes.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import suppress
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import duckdb

# Statements a read-only query may hold (EXPLAIN runs nothing; PRAGMA/DESCRIBE/SHOW/
# SUMMARIZE parse as SELECT).
READ_ONLY_KINDS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


def literal(value: Any) -> str:
    """``value`` as a DuckDB SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"'{value}'::DOUBLE"
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else f"'{value}'::DOUBLE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"from_hex('{bytes(value).hex()}')"
    if isinstance(value, datetime):
        kind = "TIMESTAMPTZ" if value.tzinfo is not None else "TIMESTAMP"
        return f"{kind} '{value.isoformat()}'"
    if isinstance(value, date):
        return f"DATE '{value.isoformat()}'"
    if isinstance(value, time):
        return f"TIME '{value.isoformat()}'"
    if isinstance(value, timedelta):
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        return f"to_microseconds({micros})"
    if isinstance(value, UUID):
        return f"'{value}'::UUID"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return literal(json.dumps(value, default=str)) + "::JSON"
    raise TypeError(f"no SQL literal for a {type(value).__name__}")


def inline(sql: str, params: list[Any] | tuple[Any, ...] | None) -> str:
    """``sql`` with its ``?`` / ``$n`` placeholders replaced by literals of ``params``.

    Placeholders inside quoted strings, quoted identifiers and comments are left alone.
    """
    if not params:
        return sql
    out: list[str] = []
    i, n, position = 0, len(sql), 0
    used: set[int] = set()
    while i < n:
        c = sql[i]
        if c in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:  # doubled quote
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
        elif c == "?":
            if position >= len(params):
                raise ValueError(f"more placeholders than the {len(params)} parameters given")
            out.append(literal(params[position]))
            used.add(position)
            position += 1
            i += 1
        elif c == "$" and i + 1 < n and sql[i + 1].isdigit():
            end = i + 1
            while end < n and sql[end].isdigit():
                end += 1
            index = int(sql[i + 1 : end]) - 1
            if not 0 <= index < len(params):
                raise ValueError(f"${index + 1} has no parameter ({len(params)} given)")
            out.append(literal(params[index]))
            used.add(index)
            i = end
        else:
            out.append(c)
            i += 1
    if len(used) != len(params):
        raise ValueError(f"{len(params)} parameters given, {len(used)} placeholders used")
    return "".join(out)


# EXPLAIN [ANALYZE] [(options)]: what it explains is checked too (EXPLAIN ANALYZE runs it).
_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\s*(\([^)]*\))?", re.IGNORECASE)


def statements(sql: str) -> list[duckdb.Statement]:
    """The statements ``sql`` holds (raises ``duckdb.ParserException`` if it does not parse)."""
    return duckdb.extract_statements(sql)


def write_statements(sql: str) -> list[str]:
    """The kinds of the statements in ``sql`` that are not read-only (empty: read-only).

    Raises ``duckdb.ParserException`` for SQL that does not parse.
    """
    return write_kinds(statements(sql))


def write_kinds(parsed: list[duckdb.Statement]) -> list[str]:
    """:func:`write_statements` of statements already parsed."""
    kinds: list[str] = []
    for statement in parsed:
        if statement.type not in READ_ONLY_KINDS:
            kinds.append(statement.type.name)
        elif statement.type == duckdb.StatementType.EXPLAIN:
            inner = _EXPLAIN.sub("", statement.query, count=1)
            # A form not unwrapped here: the read-only transaction still holds.
            with suppress(duckdb.ParserException):
                kinds.extend(write_statements(inner) if inner.strip() else [])
    return kinds
