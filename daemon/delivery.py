"""Protocol-2 delivery bookkeeping: dedupe of resent frames, acknowledgements, seq gaps.

A protocol-2 sensor resends a frame until it sees the frame's acknowledgement, so the daemon
can receive a frame more than once. ``Delivery`` decides, at ingest, whether a frame is new:

* the same frame (sensor_id, seq, part_id) is still in the daemon (queued, being scored, or
  waiting for the emitter): the copy is dropped; the original's acknowledgement answers both;
* its verdict is already in the result log: the original verdict is published again and
  acknowledged again, never scored a second time and never logged twice;
* otherwise it is new, and stays "pending" until the emitter has committed its verdict.

It also follows each sensor's seq (from the log after a restart) and counts the jumps: frames
a sensor sent that never reached the daemon. The design is in docs/protocol.md ("Protocol 2").
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from daemon.metrics import DaemonMetrics
from daemon.resultlog import LogReader
from sensors.frame import FrameMeta
from sensors.wire import encode_ack, parse_header

log = logging.getLogger("inspectd.delivery")

#: Sensors whose last seq is remembered (the least recently seen is forgotten first).
MAX_SENSORS = 4096

Key = tuple[str, int, str]


def ack_key(header: dict[str, Any]) -> Key | None:
    """The identity of a protocol-2 verdict's frame, or None when it asks for no acknowledgement."""
    sensor, seq, part = header.get("sensor_id"), header.get("seq"), header.get("part_id")
    if header.get("protocol") != 2 or not isinstance(sensor, str) or isinstance(seq, bool) or not isinstance(seq, int):
        return None
    return sensor, seq, str(part)


def peek_protocol(parts: Any) -> Any:
    """The ``protocol`` value of a refused message's header, if it can be read at all (a refused
    protocol-2 message that names its sensor and seq is still acknowledged)."""
    try:
        return parse_header(parts[0]).get("protocol") if parts else None
    except Exception:  # a refused message may be anything
        return None


class Republish:
    """An emitter item: publish a verdict already in the log again (a resent protocol-2 frame)."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header


class Delivery:
    """Which protocol-2 frames are in flight or committed, and each sensor's last seq."""

    def __init__(self, reader: LogReader, metrics: DaemonMetrics) -> None:
        self.reader = reader
        self.metrics = metrics
        self.lock = threading.Lock()
        self.pending: set[Key] = set()
        self.last_seq: OrderedDict[str, int] = OrderedDict(reader.last_seqs())
        while len(self.last_seq) > MAX_SENSORS:
            self.last_seq.popitem(last=False)
        if self.last_seq:
            log.info("last committed seq of %d sensor(s) read from the result log", len(self.last_seq))

    def classify(self, meta: FrameMeta) -> tuple[str, dict[str, Any] | None]:
        """``("new", None)``, ``("in_flight", None)`` or ``("logged", original verdict header)``.

        A protocol-1 frame is always new. A new protocol-2 frame becomes pending: call
        ``committed`` once its verdict is in the log."""
        if meta.protocol != 2:
            return "new", None
        key = (meta.sensor_id, meta.seq, meta.part_id)
        with self.lock:  # the emitter commits, then un-pends under this lock: no window between the two checks
            if key in self.pending:
                self.metrics.duplicates.labels(found="in_flight").inc()
                return "in_flight", None
            original = self.reader.find_committed(*key)
            if original is None:
                self.pending.add(key)
                return "new", None
        self.metrics.duplicates.labels(found="logged").inc()
        return "logged", original

    def committed(self, header: dict[str, Any]) -> list[bytes] | None:
        """The verdict is in the log: un-pend its frame; the acknowledgement to publish, if any."""
        key = ack_key(header)
        if key is None:
            return None
        with self.lock:
            self.pending.discard(key)
        self.metrics.acks.inc()
        return encode_ack(key[0], key[1], header.get("part_id"), int(header["verdict_id"]), str(header["verdict"]))

    def release(self, header: dict[str, Any]) -> None:
        """The verdict could not be committed: un-pend the frame so that a resend is taken as new."""
        key = ack_key(header)
        if key is not None:
            with self.lock:
                self.pending.discard(key)

    def track_seq(self, meta: FrameMeta) -> None:
        """Count and log a jump in the sensor's seq. A protocol-1 sensor that starts again from a
        lower seq starts a new sequence; a protocol-2 frame with a lower seq is a resend."""
        last = self.last_seq.get(meta.sensor_id)
        if last is not None and meta.seq > last + 1:
            missing = meta.seq - last - 1
            self.metrics.seq_gaps.inc()
            self.metrics.seq_missing.inc(missing)
            log.warning(
                "sensor %r: seq jumped from %d to %d: %d frame(s) never reached the daemon%s",
                meta.sensor_id, last, meta.seq, missing,
                " (a protocol-2 sensor resends them)" if meta.protocol == 2 else "",
            )
        if last is None or meta.protocol == 1 or meta.seq > last:
            self.last_seq[meta.sensor_id] = meta.seq
        self.last_seq.move_to_end(meta.sensor_id)
        while len(self.last_seq) > MAX_SENSORS:
            self.last_seq.popitem(last=False)
