"""JSON logs and the rotating files `horizons up` writes (logs.py)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

from horizons_platform.logs import JsonFormatter, RotatingFile, configure, pump


def test_json_lines_carry_the_group_from_the_thread_and_the_records_fields() -> None:
    stream = io.StringIO()
    configure(logging.INFO, "json", stream)
    log = logging.getLogger("horizons_platform.kafka.checkpoint")

    def in_the_writer() -> None:
        log.warning(
            "handler error",
            extra={"topic": "job-lifecycle", "partition": 3, "offset": 42, "event_id": "e-1"},
        )

    worker = threading.Thread(target=in_the_writer, name="store-metrics_0")
    worker.start()
    worker.join()
    line = json.loads(stream.getvalue().strip())
    assert line["message"] == "handler error" and line["level"] == "WARNING"
    assert line["group"] == "metrics"
    assert (line["topic"], line["partition"], line["offset"]) == ("job-lifecycle", 3, 42)
    assert line["event_id"] == "e-1" and "trace_id" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]
    configure(logging.INFO, "text", sys.stderr)


def test_a_childs_output_rolls_over_and_keeps_n_files(tmp_path: Path) -> None:
    target = RotatingFile(tmp_path / "consume.log", max_bytes=1000, backups=2)
    child = subprocess.Popen(
        [sys.executable, "-c", "for i in range(100): print(f'line {i:03d} ' + 'x' * 40)"],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    thread = pump(child.stdout, target)
    child.wait(30)
    thread.join(30)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["consume.log", "consume.log.1", "consume.log.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert (tmp_path / "consume.log").read_text().strip().endswith("line 099 " + "x" * 40)
