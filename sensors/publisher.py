"""Send frames to the daemon's ingest endpoint: the shared core of every sensor adapter.

A PUSH socket connects to the daemon's PULL socket. With a small send high-water mark, a
daemon that is busy makes ``send`` block: the sensor slows down instead of losing frames.
``rate`` paces a stream (frames per second); 0 sends as fast as the daemon accepts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import zmq

from sensors.curve import ClientKeys, apply_client_keys
from sensors.frame import Frame
from sensors.wire import encode_frame


class FramePusher:
    def __init__(self, endpoint: str, hwm: int = 4, send_timeout_ms: int = -1, keys: ClientKeys | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self.sock.setsockopt(zmq.LINGER, 10_000)
        apply_client_keys(self.sock, keys)
        self.sock.connect(endpoint)

    def send(self, frame: Frame) -> None:
        """Send one frame; blocks while the daemon applies backpressure (raises zmq.Again on timeout)."""
        self.sock.send_multipart(encode_frame(frame), copy=False)

    def send_parts(self, parts: list) -> None:
        """Send raw parts (tests use it to send malformed messages)."""
        self.sock.send_multipart(parts)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> FramePusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream(
    frames: Iterable[Frame], endpoint: str, rate: float = 0.0, on_sent: Callable[[Frame], None] | None = None,
    stop: threading.Event | None = None, keys: ClientKeys | None = None,
) -> int:
    """Push every frame to ``endpoint`` at ``rate`` frames/s (0 = unpaced); returns the count sent.

    Setting ``stop`` ends the stream before the next frame (a sensor told to stop finishes the
    frame it is sending, so the count it reports is exact)."""
    sent = 0
    period = 1.0 / rate if rate > 0 else 0.0
    stop = stop or threading.Event()
    with FramePusher(endpoint, keys=keys) as pusher:
        next_at = time.monotonic()
        for frame in frames:
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                next_at = max(next_at + period, time.monotonic() - period)
            if stop.is_set():
                break
            pusher.send(frame)
            sent += 1
            if on_sent:
                on_sent(frame)
    return sent
