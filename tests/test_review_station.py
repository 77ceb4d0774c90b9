"""The review station in a real browser (Debian's headless Chromium, driven by Playwright) over a
real daemon: a sensor streams parts, the live feed and the queue show them, a point cloud's part
view is drawn with coloured points, "defective" with a kind and a marked region stores a label
and its scan, "good" on a cold-start part collects it for enrollment, a passed part found
defective later (from the history) counts as an escape; without the token every write is refused.

The screenshots go to $INSPECTD_REVIEW_PNG_DIR when set (docs/review-station-*.png are made
that way), else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from daemon.security import create_token, load_tokens
from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from workers.model_store import ZERO_SHOT_MODEL

from conftest import PRODUCT, launch_daemon

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the dev extra is not installed
    sync_playwright = None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright (python) is not installed (pip install .[dev])"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (Debian package chromium)"),
]
COLD = "washer"  # organized frames, cold start
CLOUDS = "bolt"  # point clouds, cold start


def call(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def distinct_colours(page: Page) -> int:
    """Distinct pixel colours on the part view's canvas (the background is one)."""
    return page.evaluate("""() => {
        const c = document.querySelector('#view-canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        return seen.size;
    }""")


def parts() -> list[Frame]:
    """Two cold-start point clouds, two organized cold-start frames, one enrolled part (forced to pass);
    bolt-0 and washer-1 are scans of defective parts."""
    scans = list(simulated_parts([PRODUCT], 6, 0.5, seed=31))
    bad = [f for f in scans if (f.meta.truth or {}).get("defective")]
    good = [f for f in scans if not (f.meta.truth or {}).get("defective")]
    out = []
    for f, product, part_id in [(bad[0], CLOUDS, "bolt-0"), (good[0], CLOUDS, "bolt-1"), (good[1], COLD, "washer-0"),
                                (bad[1], COLD, "washer-1"), (good[2], PRODUCT, "flange-0")]:
        points = f.points if product == COLD else f.valid_points()[::8].copy()
        out.append(Frame(points=points, meta=replace(f.meta, product=product, part_id=part_id),
                         rgb=f.rgb if product == COLD else None))
    return out


def test_review_station_in_a_browser(enrolled_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(enrolled_models / PRODUCT, models / PRODUCT)
    shutil.copytree(enrolled_models / PRODUCT, models / ZERO_SHOT_MODEL)  # any model can be the cold-start one
    tokens = tmp_path / "tokens"
    create_token(tokens, "operator")
    token = next(iter(load_tokens(tokens)))
    shots = Path(os.environ.get("INSPECTD_REVIEW_PNG_DIR") or tmp_path)
    frames = parts()
    with launch_daemon(models, tmp_path, http={"token_file": str(tokens)},
                       storage={"data_dir": str(tmp_path / "data")},
                       products={PRODUCT: {"threshold": 1e9}, COLD: {}, CLOUDS: {}},
                       cold_start={"collect_dir": str(tmp_path / "collected")}) as d, sync_playwright() as p:
        station = d.http + "/review/"
        # reads and writes need the token; the page itself holds no data
        assert call(d.http + "/v1/review/queue")[0] == 401
        assert call(d.http + "/v1/review/parts/1/label", body={"label": "good"})[0] == 401
        assert call(d.http + "/v1/review/parts/1/label", "wrong-token", {"label": "good"})[0] == 401
        with urllib.request.urlopen(station, timeout=10) as r:
            assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]

        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(station)
        page.fill("#login-token", "wrong")
        page.click("#login-btn")
        page.wait_for_selector("#login-error:has-text('refused')")
        page.fill("#login-token", token)
        page.click("#login-btn")
        page.wait_for_selector("#feed-state:has-text('live')", timeout=15000)
        assert page.evaluate("() => sessionStorage.getItem('inspectd-token')") == token
        assert token not in page.url

        with FramePusher(d.ingest) as push:  # a real sensor client
            for f in frames:
                push.send(replace(f, meta=replace(f.meta, capture_time=time.time())))
        page.click("button[data-tab=live]")
        page.wait_for_function("() => document.querySelectorAll('#live-list li').length >= 5", timeout=90000)
        page.click("button[data-tab=queue]")
        page.wait_for_function("() => document.querySelector('#queue-count').textContent === '4'", timeout=20000)
        rows = page.locator("#queue-table tbody tr")
        assert rows.count() == 4 and page.locator("#queue-table tbody tr:has-text('cold start')").count() == 4
        page.screenshot(path=str(shots / "review-station-queue.png"))

        # a point cloud's part view: points coloured by score, the threshold in the legend
        page.click("#queue-table tbody tr:has-text('bolt-0')")
        page.wait_for_selector("#view-canvas[data-kind=points]")
        assert distinct_colours(page) > 20
        assert "threshold" in page.inner_text("#legend-threshold")
        box = page.locator("#view-canvas").bounding_box()
        page.mouse.move(box["x"] + 320, box["y"] + 240)
        page.mouse.down()
        page.mouse.move(box["x"] + 380, box["y"] + 260, steps=5)  # rotate
        page.mouse.up()
        page.check("#mark-mode")
        page.mouse.move(box["x"] + 300, box["y"] + 220)
        page.mouse.down()
        page.mouse.move(box["x"] + 340, box["y"] + 260, steps=8)  # paint a region
        page.mouse.up()
        marked = int(page.inner_text("#region-count"))
        assert marked > 0
        page.fill("#kind", "dent")
        page.screenshot(path=str(shots / "review-station-part.png"))
        page.click("#btn-defective")
        page.wait_for_selector("#decision-result:has-text('stored: defective (dent) by operator')")

        # organized cold-start frames: the heat map on the image; "good" collects a part for enrollment
        page.click("#queue-table tbody tr:has-text('washer-1')")
        page.wait_for_selector("#part-title:has-text('washer-1')")
        page.wait_for_selector("#view-canvas[data-kind=image]")
        page.wait_for_function("() => document.querySelector('#view-note').textContent.includes('pixels')")
        page.wait_for_timeout(300)  # the two PNGs decode
        assert distinct_colours(page) > 20
        page.screenshot(path=str(shots / "review-station-image.png"))
        page.click("#queue-table tbody tr:has-text('washer-0')")
        page.wait_for_selector("#part-title:has-text('washer-0')")
        page.wait_for_selector("#view-canvas[data-kind=image]")
        page.click("#btn-good")
        page.wait_for_selector("#decision-result:has-text('collected for enrollment')")
        page.wait_for_function("() => document.querySelector('#queue-count').textContent === '2'", timeout=20000)

        page.click("button[data-tab=history]")  # a passed part, found defective downstream: an escape
        page.fill("#h-product", PRODUCT)
        page.select_option("#h-verdict", "pass")
        page.click("#history-form button")
        page.wait_for_selector("#history-table tbody tr:has-text('flange-0')")
        assert page.locator("#history-table tbody tr").count() == 1
        page.click("#history-table tbody tr:has-text('flange-0')")
        page.wait_for_selector("#part-title:has-text('flange-0')")
        page.wait_for_selector("#view-canvas[data-kind=points]")
        page.fill("#kind", "crack")
        page.click("#btn-defective")
        page.wait_for_selector("#decision-result:has-text('stored: defective (crack)')")

        page.click("button[data-tab=product]")
        page.wait_for_selector("#p-escape")
        page.select_option("#p-select", PRODUCT)
        page.wait_for_selector("#p-escape:has-text('1 of 1')")
        page.wait_for_selector("#shadow-body:has-text('no shadow model')")
        page.select_option("#p-select", CLOUDS)
        page.wait_for_selector("#product-body:has-text('cold start')")
        assert "1 defective" in page.inner_text("#product-body")
        page.screenshot(path=str(shots / "review-station-product.png"), full_page=True)
        assert not errors, errors
        browser.close()

        metrics = d.metrics()
        assert f'inspectd_review_queue_parts{{product="{CLOUDS}"}} 1.0' in metrics
        assert f'inspectd_labels_total{{label="defective",product="{CLOUDS}"}} 1.0' in metrics

    bad = tmp_path / "data" / "labels" / CLOUDS / "defective" / "bolt-0"
    meta = json.loads(bad.with_suffix(".json").read_text())
    assert meta["kind"] == "dent" and meta["user"] == "operator" and len(meta["region"]) == marked
    with np.load(bad.with_suffix(".npz")) as z:
        assert z["points"].dtype == np.float32 and z["mask"].sum() == marked
    good = tmp_path / "data" / "labels" / COLD / "good" / "washer-0.json"
    assert json.loads(good.read_text())["label"] == "good"
    assert [f.name for f in (tmp_path / "collected" / COLD / "good").iterdir()] == ["washer-0.tiff"]
