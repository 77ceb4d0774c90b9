"""Fuzzing ingest: ten thousand structure-aware mutations of valid frames and random byte messages,
with valid frames in between, through a real daemon on loopback (about a minute).

Checked: every message gets exactly one verdict (the result log gains one row per message, and
the subscriber sees as many), every valid frame in between is scored, no thread dies, the
daemon's RSS grows by less than RSS_GROWTH_MB after warm-up, and /metrics stays small."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from fuzz import mutated_messages
from procstats import log_reasons, log_rows, rss_mb, wait_rows

from sensors.frame import FrameError
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from sensors.wire import decode_frame, encode_verdict, salvage_header

from conftest import PRODUCT, launch_daemon

N_MUTATIONS = 10_000
VALID_EVERY = 250
RSS_GROWTH_MB = 100.0
METRICS_MAX_BYTES = 64_000


def test_decoder_answers_every_mutation_with_a_reason() -> None:
    """In-process: the decoder refuses with a FrameError, salvage never raises, the verdict encodes."""
    for parts in mutated_messages(3000, seed=2, capture_time=time.time()):
        try:
            decode_frame(parts)
        except FrameError:
            pass
        encode_verdict({**salvage_header(parts), "verdict": "error"}, None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzzed_ingest_answers_everything(enrolled_models: Path, tmp_path: Path) -> None:
    valid = list(simulated_parts([PRODUCT], N_MUTATIONS // VALID_EVERY, 0.0, seed=40, good_only=True))
    with launch_daemon(enrolled_models, tmp_path, storage={"maps": "none"}, publish={"maps": "none"},
                       ingest={"max_sensor_labels": 4, "max_age_ms": 120_000}) as d:
        db = tmp_path / "results.sqlite"
        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        metrics_before = len(d.metrics())
        received, sent, rss = 0, 0, []
        t0 = time.monotonic()
        with FramePusher(d.ingest) as push:
            for i, parts in enumerate(mutated_messages(N_MUTATIONS, seed=1, capture_time=time.time())):
                if i % VALID_EVERY == VALID_EVERY // 2:
                    f = valid[i // VALID_EVERY]
                    push.send(replace(f, meta=replace(f.meta, part_id=f"ok-{i}", capture_time=time.time())))
                    sent += 1
                push.send_parts(parts)
                sent += 1
                while sub.poll(0):
                    sub.recv_multipart()
                    received += 1
                if i == 1000:
                    wait_rows(db, sent, timeout=60)
                    rss.append(rss_mb(d.proc.pid))
        rows = wait_rows(db, sent, timeout=60)
        elapsed = time.monotonic() - t0
        while sub.poll(2000):
            sub.recv_multipart()
            received += 1
        rss.append(rss_mb(d.proc.pid))
        ctx.destroy(linger=0)
        metrics_after = len(d.metrics())
        scored = log_rows(db, "part_id LIKE 'ok-%' AND verdict IN ('pass', 'review', 'fail')")
        internal = log_rows(db, "error_reason = 'internal_error'")
        log_text = (tmp_path / "daemon.log").read_text()
        print(f"fuzz: {sent} messages in {elapsed:.0f}s, {rows} rows, {received} published, "
              f"RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB, /metrics {metrics_before} -> {metrics_after} B")
        assert rows == sent and received == sent
        assert scored == N_MUTATIONS // VALID_EVERY, log_reasons(db, "part_id LIKE 'ok-%' AND verdict = 'error'")
        assert internal == 0 and "Exception in thread" not in log_text
        assert rss[-1] - rss[0] < RSS_GROWTH_MB
        assert metrics_after < METRICS_MAX_BYTES
        with FramePusher(d.ingest) as push:  # ingest still reads after all of it
            push.send(replace(valid[0], meta=replace(valid[0].meta, part_id="last", capture_time=time.time())))
        assert wait_rows(db, 1, timeout=60, where="part_id = 'last'") == 1
