"""Log lines as JSON (``inspectd --log-format json``) for journald and Loki."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from daemon.cli import JsonLogFormatter


def test_json_formatter_writes_one_object_per_record() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("inspectd.test").makeRecord(
            "inspectd.test", logging.WARNING, __file__, 1, "part %s refused", ("A-1",), sys.exc_info())
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "inspectd.test"
    assert entry["message"] == "part A-1 refused"
    assert "RuntimeError: boom" in entry["exception"]


def test_the_cli_logs_json_lines(tmp_path) -> None:
    """A real command's log output, every stderr line of which is a JSON object."""
    run = subprocess.run(
        [sys.executable, "-c", "import logging, sys; from daemon.cli import _setup_logging; "
         "_setup_logging(False, 'json'); logging.getLogger('inspectd.x').info('hello %d', 7)"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    assert lines and lines[-1]["message"] == "hello 7" and lines[-1]["time"].endswith("Z")
