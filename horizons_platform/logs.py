"""How the platform logs: human text by default, one JSON object per line with
``HORIZONS_LOG_FORMAT=json``; and the rotating files `horizons up` writes.

JSON lines carry the consumer group (from the thread: every group's loop and writer
threads are named after it) and, where a log call passes them as ``extra``, the record's
topic, partition, offset, event_id and trace id.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

RECORD_FIELDS = ("group", "topic", "partition", "offset", "event_id", "trace_id")
_GROUP_THREAD = re.compile(r"^(?:consumer|store|close)-(?P<group>[a-z-]+?)(?:_\d+)?$")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        m = _GROUP_THREAD.match(record.threadName or "")
        if m:
            out["group"] = m.group("group")
        for name in RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: int, fmt: str = "text", stream: IO[str] = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RotatingFile:
    """A log file that rolls over at ``max_bytes`` (name.log → name.log.1 … .N)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = path.open("ab")

    def write(self, data: bytes) -> None:
        if self._file.tell() + len(data) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
        self._file.write(data)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("ab")

    def close(self) -> None:
        self._file.close()


def pump(source: IO[bytes], target: RotatingFile) -> threading.Thread:
    """Copy a child's output into ``target`` line by line, on a thread of its own."""

    def run() -> None:
        try:
            for line in iter(source.readline, b""):
                target.write(line)
        finally:
            target.close()

    thread = threading.Thread(target=run, name=f"log-{target.path.name}", daemon=True)
    thread.start()
    return thread
