"""The daemon as a child process, for the demo, the bench and the tests: start ``inspectd run``,
wait for /readyz, and stop it the way systemd does (SIGTERM, drained, exit code checked)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the daemon was not ready after {timeout:.0f}s ({url})")


class DaemonProcess:
    """``with DaemonProcess(config, log, http_url) as d:`` runs a ready daemon for the block."""

    def __init__(self, config: Path, log: Path, http_url: str, ready_timeout: float = 180.0) -> None:
        self.config, self.log_path, self.http_url, self.ready_timeout = config, log, http_url, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_ready(self.http_url + "/readyz", self.proc, self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain, kill if it hangs; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        self._log.close()
        return self.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
