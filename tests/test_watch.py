"""The hot-folder adapter (``inspectd sensor watch``): complete files only, done/ and failed/,
nothing sent twice across restarts; against a PULL socket, then against the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sensors.pointfiles import write_pcd, write_xyz_tiff
from sensors.simulated import simulated_parts
from sensors.watch import JOURNAL, HotFolder, Journal
from sensors.wire import decode_frame
from tools.process import free_port

from conftest import PRODUCT, RunningDaemon, receive_verdicts


def write_ply(path: Path, points: np.ndarray) -> None:
    """An ASCII PLY point cloud (the scanner-side format; the reader is open3d)."""
    head = f"ply\nformat ascii 1.0\nelement vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    path.write_text(head + "\n".join(f"{x:.4f} {y:.4f} {z:.4f}" for x, y, z in points) + "\n")


def write_slowly(path: Path, data: bytes, chunks: int = 4, pause: float = 0.25) -> None:
    """Write ``data`` in ``chunks`` pieces with pauses shorter than the settle time, as a slow scanner."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            time.sleep(pause)


def clouds(n: int, seed: int, stride: int = 16) -> list[np.ndarray]:
    """``n`` small unorganized clouds (every ``stride``-th valid point of a simulated scan)."""
    return [f.valid_points()[::stride].copy() for f in simulated_parts([PRODUCT], n, 0.0, seed=seed, good_only=True)]


class Receiver:
    """A PULL socket standing in for the daemon: collects the frames the adapter sends."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.endpoint)

    def frames(self, n: int, timeout: float) -> list:
        out = []
        deadline = time.time() + timeout
        while len(out) < n and time.time() < deadline:
            if self.sock.poll(100):
                out.append(decode_frame(self.sock.recv_multipart()))
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def run_folder(folder: Path, endpoint: str, settle: float = 0.6) -> tuple[threading.Event, threading.Thread, HotFolder]:
    hf = HotFolder(folder, PRODUCT, endpoint, settle_s=settle, sensor_id="watch-t")
    stop = threading.Event()
    t = threading.Thread(target=hf.run, args=(stop,), daemon=True)
    t.start()
    time.sleep(0.3)
    return stop, t, hf


def test_complete_files_only_and_failed_with_reason(tmp_path: Path) -> None:
    pts = clouds(1, seed=3)[0]
    rx = Receiver()
    write_pcd(tmp_path / "early.pcd", pts)  # present before the adapter starts
    stop, t, hf = run_folder(tmp_path, rx.endpoint)
    try:
        src = tmp_path / "src.pcd.bin"
        write_pcd(src, pts)
        write_slowly(tmp_path / "slow.pcd", src.read_bytes(), chunks=5, pause=0.2)
        src.unlink()
        write_pcd(tmp_path / "renamed.pcd.part", pts)
        time.sleep(1.0)
        assert (tmp_path / "renamed.pcd.part").exists()  # a temp suffix is never taken
        (tmp_path / "renamed.pcd.part").rename(tmp_path / "renamed.pcd")
        (tmp_path / "broken.pcd").write_bytes(b"# .PCD v0.7\nFIELDS x y z\nnot a header\n")
        (tmp_path / "notes.txt").write_text("not a scan")
        got = rx.frames(3, timeout=20)
        time.sleep(1.0)
        assert not rx.frames(1, timeout=0.5)
    finally:
        stop.set()
        t.join(timeout=20)
        rx.close()
    assert sorted(f.meta.part_id for f in got) == ["early", "renamed", "slow"]
    assert all(f.points.shape == pts.shape for f in got)  # the slow file was read whole
    assert sorted(f.meta.seq for f in got) == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["early.pcd", "renamed.pcd", "slow.pcd"]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["broken.pcd", "broken.pcd.reason.txt"]
    assert "PointFileError" in (tmp_path / "failed" / "broken.pcd.reason.txt").read_text()
    assert (tmp_path / "notes.txt").exists()
    assert hf.sent == 3 and hf.failed == 1


def test_journal_prevents_resend_and_continues_seq(tmp_path: Path) -> None:
    pts = clouds(1, seed=4)[0]
    rx = Receiver()
    try:
        write_pcd(tmp_path / "a.pcd", pts)
        stop, t, _ = run_folder(tmp_path, rx.endpoint, settle=0.3)
        assert [f.meta.seq for f in rx.frames(1, timeout=15)] == [0]
        stop.set()
        t.join(timeout=20)
        # a crash after the send was journalled but before the move leaves the file in place
        (tmp_path / "done" / "a.pcd").rename(tmp_path / "a.pcd")
        write_pcd(tmp_path / "b.pcd", pts)
        stop, t, hf = run_folder(tmp_path, rx.endpoint, settle=0.3)
        got = rx.frames(2, timeout=10)
        stop.set()
        t.join(timeout=20)
    finally:
        rx.close()
    assert [(f.meta.part_id, f.meta.seq) for f in got] == [("b", 1)]
    assert hf.sent == 1
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["a.pcd", "b.pcd"]
    lines = [json.loads(x) for x in (tmp_path / JOURNAL).read_text().splitlines()]
    assert max(r.get("seq", -1) for r in lines) == 1


def test_journal_stays_small_and_keeps_the_last_seq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Journal, "COMPACT_EVERY", 4)
    (tmp_path / "here.pcd").write_bytes(b"x")
    j = Journal(tmp_path)
    j.record("here.pcd", "taken", seq=0, size=1, mtime_ns=1)
    for i in range(1, 11):  # files that have left the folder
        j.record(f"gone-{i}.pcd", "sent", seq=i)
    j.close()
    assert len((tmp_path / JOURNAL).read_text().splitlines()) <= 6
    j = Journal(tmp_path)
    assert j.last_seq == 10 and set(j.entries) == {"here.pcd"} and j.entries["here.pcd"]["state"] == "taken"
    j.close()


def start_watcher(folder: Path, daemon: RunningDaemon) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "sensor", "watch", str(folder), "--product", PRODUCT,
         "--endpoint", daemon.ingest, "--settle", "0.8", "--sensor-id", "hotfolder-e2e"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().startswith("inspectd sensor watch: watching")
    return proc


def stop_watcher(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_fifty_files_fifty_answers_across_a_watcher_restart(daemon: RunningDaemon, tmp_path: Path) -> None:
    """50 files (slow writers, renames, 3 formats, 5 corrupt) → 45 verdicts + 5 in failed/, none twice."""
    folder = tmp_path / "hot"
    folder.mkdir()
    base = clouds(3, seed=41)
    tiff = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=42, good_only=True))).points[::4, ::4].copy()
    corrupt = {7, 18, 26, 33, 47}

    def drop(i: int) -> str:
        name = f"part-{i:03d}"
        if i in corrupt:
            kind = i % 3
            if kind == 0:
                (folder / f"{name}.pcd").write_bytes(b"# .PCD v0.7\nFIELDS x y z\nSIZE 4 4\nDATA ascii\n1 2\n")
            elif kind == 1:
                (folder / f"{name}.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 99\n")
            else:
                (folder / f"{name}.tiff").write_bytes(b"II*\x00garbage" * 10)
            return name
        pts = base[i % 3]
        if i % 10 == 3:
            write_xyz_tiff(folder / f"{name}.tiff", tiff)
        elif i % 10 == 6:
            write_ply(folder / f"{name}.ply", pts[::2])
        elif i % 5 == 1:  # a slow scanner: written in chunks
            tmp = tmp_path / f"{name}.pcd"
            write_pcd(tmp, pts)
            write_slowly(folder / f"{name}.pcd", tmp.read_bytes(), chunks=4, pause=0.2)
        elif i % 5 == 2:  # written under a temp name, renamed into place
            write_pcd(folder / f"{name}.pcd.part", pts)
            (folder / f"{name}.pcd.part").rename(folder / f"{name}.pcd")
        else:
            write_pcd(folder / f"{name}.pcd", pts)
        return name

    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    for i in range(5):  # present before the watcher starts
        drop(i)
    watcher = start_watcher(folder, daemon)
    for i in range(5, 25):
        drop(i)
        time.sleep(0.05)
    first = receive_verdicts(sub, 1, timeout=60)
    deadline = time.time() + 60
    while len(list((folder / "done").glob("*"))) < 8 and time.time() < deadline:
        time.sleep(0.2)
    counts = [stop_watcher(watcher)]  # restart in the middle: some files done, some waiting
    for i in range(25, 35):
        drop(i)
    watcher = start_watcher(folder, daemon)
    for i in range(35, 50):
        drop(i)
        time.sleep(0.05)
    verdicts = first + receive_verdicts(sub, 44, timeout=90)
    time.sleep(2.0)  # anything sent twice would arrive now
    while sub.poll(100):
        from sensors.wire import decode_verdict

        verdicts.append(decode_verdict(sub.recv_multipart()))
    counts.append(stop_watcher(watcher))
    ctx.destroy(linger=0)

    mine = [v.header for v in verdicts if v.header.get("sensor_id") == "hotfolder-e2e"]
    ids = [h["part_id"] for h in mine]
    good = {f"part-{i:03d}" for i in range(50) if i not in corrupt}
    assert len(ids) == len(set(ids)), "a file was sent twice"
    assert set(ids) == good
    assert sorted(h["seq"] for h in mine) == list(range(45))  # seq continues across the restart
    assert not [h["error"] for h in mine if h["verdict"] == "error"]
    failed = {p.stem for p in (folder / "failed").iterdir() if not p.name.endswith(".reason.txt")}
    assert failed == {f"part-{i:03d}" for i in corrupt}
    assert len(list((folder / "failed").glob("*.reason.txt"))) == 5
    assert {p.stem for p in (folder / "done").iterdir()} == good
    assert sum(c["sent"] for c in counts) == 45 and sum(c["failed"] for c in counts) == 5
    assert not [p for p in folder.iterdir() if p.is_file() and p.name != JOURNAL]
