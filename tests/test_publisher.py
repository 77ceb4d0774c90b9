"""The protocol-2 sender (``AckedPusher``) against a stand-in daemon: real ZeroMQ sockets on
loopback, the stand-in acknowledging by hand. Fast: no daemon, no Ray."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import zmq

from sensors.frame import Frame, FrameMeta
from sensors.publisher import AckedPusher
from sensors.wire import decode_frame, encode_ack
from tools.process import free_port


def frame(seq: int) -> Frame:
    meta = FrameMeta(sensor_id="cam", product="flange", part_id=f"p{seq}", seq=seq, capture_time=time.time())
    return Frame(points=np.ones((4, 3), np.float32), meta=meta)


class StandIn:
    """A PULL socket that reads frames and a PUB socket the test acknowledges them on."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.ingest, self.publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.ingest)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.publish)

    def receive(self, timeout_ms: int = 3000) -> Frame | None:
        return decode_frame(self.pull.recv_multipart()) if self.pull.poll(timeout_ms) else None

    def ack(self, f: Frame, verdict_id: int) -> None:
        self.pub.send_multipart(encode_ack("cam", f.meta.seq, f.meta.part_id, verdict_id, "pass"))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_outbox_blocks_when_full_and_empties_on_acks() -> None:
    d = StandIn()
    try:
        with AckedPusher(d.ingest, d.publish, outbox=2, ack_timeout_s=60) as p:
            time.sleep(0.3)  # the subscription reaches the stand-in
            p.send(frame(0))
            p.send(frame(1))
            got = [d.receive(), d.receive()]
            assert [f.meta.protocol for f in got] == [2, 2]
            third = threading.Thread(target=p.send, args=(frame(2),))
            third.start()
            third.join(0.5)
            assert third.is_alive()  # the outbox is full: send blocks (never drops)
            d.ack(got[0], 1)
            third.join(5)
            assert not third.is_alive()
            d.ack(got[1], 2)
            d.ack(d.receive(), 3)
            assert p.wait(5) == 0
            assert (p.stats.sent, p.stats.acked, p.stats.unacked, p.stats.resent) == (3, 3, 0, 0)
    finally:
        d.close()


def test_unacknowledged_frames_are_resent_after_the_timeout_and_reported() -> None:
    d = StandIn()
    try:
        with AckedPusher(d.ingest, d.publish, ack_timeout_s=0.5) as p:
            time.sleep(0.3)
            p.send(frame(7))
            first = d.receive()
            assert first is not None and first.meta.seq == 7
            assert p.wait(1.5) == 1  # no ack: still outstanding, and resent meanwhile
            again = d.receive()
            assert again is not None and (again.meta.seq, again.meta.part_id) == (7, "p7")
            assert p.stats.resent >= 1
            d.ack(first, 9)
            d.pub.send_multipart([b"ack/cam/", json.dumps({"type": "ack", "seq": "x"}).encode()])  # ignored
            assert p.wait(5) == 0 and p.stats.unacked == 0
    finally:
        d.close()
