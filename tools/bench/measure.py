"""Measuring helpers of the bench: the machine it ran on, the load, peak resident memory, percentiles."""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine may be shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, GPU, Python, torch and platform of this machine (every result records them)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }



class PeakRSS:
    """Samples the resident memory of a process (and optionally its children) in a thread.

    Each process's own pages count, and shared pages once: the largest process's (libraries, and
    Ray's object store, which the daemon and every actor map; summing their RSS counted it once
    per process).

    Cheap on purpose, since it runs beside what is being timed: it finds the children (a walk over
    every process of the machine, about 2 ms) only every ``refresh`` seconds, and reads their
    memory every ``period`` seconds. Walking the process table at every 20 ms sample took about 11 %
    of a core, on a 2-core machine where the scorer's FPFH wants both. ``cpu_fraction`` is the
    share of one core the sampler itself used."""

    def __init__(self, pid: int, children: bool = False, period: float = 0.05, refresh: float = 1.0) -> None:
        self.proc = psutil.Process(pid)
        self.children = children
        self.period = period
        self.refresh = refresh
        self.peak = 0
        self.cpu_fraction = 0.0
        self._procs: list[psutil.Process] = [self.proc]
        self._found_at = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        now = time.monotonic()
        if self.children and now - self._found_at >= self.refresh:
            try:
                self._procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                pass
            self._found_at = now
        own, shared = 0, 0
        for p in self._procs:
            try:
                m = p.memory_info()
            except psutil.Error:
                continue
            own += m.rss - m.shared
            shared = max(shared, m.shared)
        return own + shared

    def _run(self) -> None:
        cpu0, wall0 = time.thread_time(), time.monotonic()
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.period)
        self.peak = max(self.peak, self._sample())
        self.cpu_fraction = (time.thread_time() - cpu0) / max(1e-9, time.monotonic() - wall0)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when there are none)."""
    return float(np.percentile(values, q)) if values else float("nan")
