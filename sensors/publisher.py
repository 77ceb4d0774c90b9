"""Send frames to the daemon's ingest endpoint: the shared core of every sensor adapter.

A PUSH socket connects to the daemon's PULL socket. With a small send high-water mark, a
daemon that is busy makes ``send`` block: the sensor slows down instead of losing frames.
``rate`` paces a stream (frames per second); 0 sends as fast as the daemon accepts.

``FramePusher`` speaks protocol 1 (fire and forget). ``AckedPusher`` speaks protocol 2: it
keeps every frame in a bounded outbox until the daemon acknowledges it (the verdict is in the
daemon's result log), resends what is unacknowledged after a reconnect or a timeout, and can
wait at the end for the last acknowledgements (docs/protocol.md, "Protocol 2").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import zmq
from zmq.utils.monitor import recv_monitor_message

from sensors.curve import ClientKeys, apply_client_keys
from sensors.frame import Frame, FrameError
from sensors.wire import ack_topic, decode_ack, encode_frame

log = logging.getLogger("inspectd.sensor")


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


@dataclass
class DeliveryStats:
    """What a protocol-2 sensor can say at the end: frames sent, acknowledged, still unacknowledged."""

    sent: int = 0
    acked: int = 0
    resent: int = 0

    @property
    def unacked(self) -> int:
        return self.sent - self.acked


class AckedPusher:
    """Protocol-2 sender: frames stay in a bounded outbox until acknowledged, and are resent.

    ``send`` blocks while the outbox is full (backpressure, never a drop). Acknowledgements arrive
    on the daemon's verdict PUB socket (``verdicts``), topic ``ack/<sensor_id>/``. A frame is sent
    again when the PUSH socket reconnects (the daemon restarted) or when its acknowledgement is
    ``ack_timeout_s`` late (PUB may drop); the daemon answers a copy with the original verdict.
    Everything runs in the caller's thread, so no socket is shared."""

    def __init__(
        self, endpoint: str, verdicts: str, outbox: int = 64, ack_timeout_s: float = 30.0, hwm: int = 4,
        stop: threading.Event | None = None, keys: ClientKeys | None = None,
    ) -> None:
        self.stop = stop or threading.Event()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, hwm)
        self.push.setsockopt(zmq.LINGER, 0)  # what is not acknowledged at close is reported, not flushed
        apply_client_keys(self.push, keys)
        self.monitor = self.push.get_monitor_socket(zmq.EVENT_CONNECTED)
        self.push.connect(endpoint)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 10_000)
        self.sub.setsockopt(zmq.LINGER, 0)
        apply_client_keys(self.sub, keys)
        self.sub.connect(verdicts)
        self.subscribed: set[str] = set()
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.capacity = outbox
        self.ack_timeout = ack_timeout_s
        self.outbox: OrderedDict[tuple[str, int], tuple[Frame, float]] = OrderedDict()
        self.connects = 0
        self.stats = DeliveryStats()

    def send(self, frame: Frame) -> None:
        """Send one frame as protocol 2; blocks while the outbox is full or the daemon pushes back."""
        m = frame.meta
        key = (m.sensor_id, m.seq)
        if key in self.outbox:
            raise ValueError(f"seq {m.seq} of sensor {m.sensor_id!r} is still waiting for its acknowledgement")
        if m.sensor_id not in self.subscribed:
            self.sub.setsockopt(zmq.SUBSCRIBE, ack_topic(m.sensor_id))
            self.subscribed.add(m.sensor_id)
        frame = replace(frame, meta=replace(m, protocol=2))
        while len(self.outbox) >= self.capacity:
            self._check_stop()
            self.pump(100)
        parts = encode_frame(frame)
        while not self._try_send(parts):
            self._check_stop()
            self.pump(50)
        self.outbox[key] = (frame, time.monotonic())
        self.stats.sent += 1
        self.pump(0)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise InterruptedError("the sensor was told to stop while the daemon pushed back")

    def _try_send(self, parts: list) -> bool:
        try:
            self.push.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def pump(self, timeout_ms: int) -> None:
        """Take in acknowledgements and connection events for up to ``timeout_ms``; resend what is due."""
        events = dict(self.poller.poll(timeout_ms))
        while self.monitor in events and self.monitor.poll(0):
            if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_CONNECTED:
                self.connects += 1
                if self.connects > 1:  # the daemon came back: everything unacknowledged is due now
                    log.info("reconnected: resending %d unacknowledged frame(s)", len(self.outbox))
                    for k, (f, _) in self.outbox.items():
                        self.outbox[k] = (f, float("-inf"))
        while self.sub.poll(0):
            try:
                ack = decode_ack(self.sub.recv_multipart())
            except FrameError:
                continue
            key = (ack.get("sensor_id"), ack["seq"])
            entry = self.outbox.get(key)  # type: ignore[arg-type]
            if entry is not None and entry[0].meta.part_id == ack.get("part_id"):
                del self.outbox[key]  # type: ignore[arg-type]
                self.stats.acked += 1
        self._resend_due()

    def _resend_due(self) -> None:
        now = time.monotonic()
        for key, (frame, sent_at) in list(self.outbox.items()):
            if now - sent_at < self.ack_timeout:
                continue
            if not self._try_send(encode_frame(frame)):
                return  # the daemon pushes back (or is away): try again on the next pump
            self.outbox[key] = (frame, now)
            self.outbox.move_to_end(key)
            self.stats.resent += 1

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every outstanding acknowledgement; returns how many are missing."""
        deadline = time.monotonic() + timeout_s
        while self.outbox and time.monotonic() < deadline:
            self.pump(100)
        return len(self.outbox)

    def close(self) -> None:
        self.push.disable_monitor()
        self.ctx.destroy(linger=0)

    def __enter__(self) -> AckedPusher:
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
    with FramePusher(endpoint, keys=keys) as pusher:
        return _paced(frames, pusher.send, rate, on_sent, stop)


def stream_acked(
    frames: Iterable[Frame], endpoint: str, verdicts: str, rate: float = 0.0, wait_s: float = 120.0,
    outbox: int = 64, ack_timeout_s: float = 30.0, stop: threading.Event | None = None,
    on_sent: Callable[[Frame], None] | None = None, keys: ClientKeys | None = None,
) -> DeliveryStats:
    """``stream`` in protocol 2: then wait up to ``wait_s`` for the outstanding acknowledgements
    (``stop`` ends the wait too: what is unacknowledged then is reported as such)."""
    stop = stop or threading.Event()
    with AckedPusher(endpoint, verdicts, outbox=outbox, ack_timeout_s=ack_timeout_s, stop=stop, keys=keys) as pusher:
        try:
            _paced(frames, pusher.send, rate, on_sent, stop)
        except InterruptedError:
            pass
        deadline = time.monotonic() + wait_s
        while pusher.outbox and time.monotonic() < deadline and not stop.wait(0):
            pusher.pump(100)
        return pusher.stats


def _paced(
    frames: Iterable[Frame], send: Callable[[Frame], None], rate: float,
    on_sent: Callable[[Frame], None] | None, stop: threading.Event | None,
) -> int:
    """Send frames through ``send`` at ``rate`` frames/s until they end or ``stop`` is set."""
    sent = 0
    period = 1.0 / rate if rate > 0 else 0.0
    stop = stop or threading.Event()
    next_at = time.monotonic()
    for frame in frames:
        if period:
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            next_at = max(next_at + period, time.monotonic() - period)
        if stop.is_set():
            break
        send(frame)
        sent += 1
        if on_sent:
            on_sent(frame)
    return sent
