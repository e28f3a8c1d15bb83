"""Time-ordered ids (RFC 9562 UUIDv7), for every key the platform mints itself.

DuckDB keeps each PRIMARY KEY and UNIQUE constraint in an ART index and, at every
checkpoint, writes each index node an insert touched since the last one. Random keys
(UUIDv4) touch nodes all over the index, so each checkpoint writes nearly all of it and
takes longer the more rows are stored — while every writer waits for it: with v4 event
ids a checkpoint of 50,000 events' rows took 1.6 s beside 1,000,000 stored events and
6.0 s beside 3,000,000 (`horizons bench checkpoint`, docs/kpis.md). Keys that grow with
time only touch the index's newest edge; the same checkpoint then costs the same at any
store size.
"""

from __future__ import annotations

import os
import time
import uuid

_RAND_B = (1 << 62) - 1


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix milliseconds, then 74 random bits (RFC 9562, 5.7)."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68) << 64  # rand_a: 12 bits
        | 0b10 << 62  # the RFC's variant
        | rand & _RAND_B
    )
    return uuid.UUID(int=value)


def is_time_ordered(text: str) -> bool:
    """Whether canonical UUID text is a v7 (its version digit is 7)."""
    return len(text) == 36 and text[14] == "7"


def derived_from(time_ordered: str, digest: bytes) -> str:
    """A UUIDv8 (RFC 9562, 5.8) with ``time_ordered``'s 48 bits of milliseconds first and
    ``digest``'s bytes 6–15 after: an id derived from a v7 id (by hashing it with what
    else names the thing) that sorts with it, so that it too keeps its index's
    checkpoints flat. The same inputs give the same id."""
    out = bytearray(bytes.fromhex(time_ordered[:8] + time_ordered[9:13]) + digest[6:16])
    out[6] = (out[6] & 0x0F) | 0x80  # version 8
    out[8] = (out[8] & 0x3F) | 0x80  # the RFC's variant
    h = out.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
