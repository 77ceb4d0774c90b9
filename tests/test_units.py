"""Real units: frames say what unit their coordinates are in, preprocessing works in mm, and
``inspectd eval`` runs to the end on an MVTec 3D-AD-layout dataset stored in metres, listing
(not dying on) a sample it cannot score.

The fixture ``tests/fixtures/mvtec3d-metres`` is in the published format and units (see
``tests/fixtures/make_mvtec_metres.py``); eval runs on a copy of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sensors.datasets import LAYOUT_UNITS, dataset_units, list_samples
from sensors.frame import UNITS_MM, Frame, FrameError, FrameMeta
from sensors.replay import replay_frames
from sensors.wire import decode_frame, encode_frame
from tools.cli import main
from tools.evaluation.protocol import recompute_metrics
from workers.preprocess import PreprocessParams, prepare

from malformed import header_and_buffers

FIXTURE = Path(__file__).parent / "fixtures" / "mvtec3d-metres"


def _frame(points: np.ndarray, units: str) -> Frame:
    return Frame(points=points.astype(np.float32), meta=FrameMeta("cam", "nut", "p", 0, 0.0, units=units))


def test_units_are_validated_and_travel_on_the_wire() -> None:
    assert UNITS_MM == {"mm": 1.0, "m": 1000.0, "um": 0.001, "in": 25.4}
    pts = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(FrameError, match="units 'furlong'") as err:
        _frame(pts, "furlong")
    assert err.value.reason == "bad_field"
    frame = _frame(pts / 1000.0, "m")
    back = decode_frame([bytes(p) for p in encode_frame(frame)])
    assert back.meta.units == "m"
    with pytest.raises(FrameError) as err:
        decode_frame(header_and_buffers(units="µm"))
    assert err.value.reason == "bad_field"


def test_preprocessing_works_in_mm_whatever_the_frame_units() -> None:
    sample = list_samples(FIXTURE, "mvtec3d", "nut", "train")[0]
    metres = sample.load()
    assert metres.meta.units == "m" and np.nanmax(metres.points[..., 2]) < 1.0
    mm = replace(metres, points=metres.points * np.float32(1000.0), meta=replace(metres.meta, units="mm"))
    pp = PreprocessParams(remove_plane=True, voxel_size=2.0)
    a, b = prepare(metres, pp), prepare(mm, pp)
    np.testing.assert_array_equal(a.source_flat, b.source_flat)  # the map lines up with the frame's pixels
    np.testing.assert_allclose(a.points, b.points, atol=1e-3)
    assert len(a.points) > 50 and a.frame is not None and a.frame.meta.units == "mm"
    # micrometres and inches scale the same way
    pts = np.random.default_rng(1).uniform(0, 50, size=(400, 3))
    flat = PreprocessParams(remove_plane=False, voxel_size=1.0)
    ref = prepare(_frame(pts, "mm"), flat).points
    np.testing.assert_allclose(prepare(_frame(pts * 1000.0, "um"), flat).points, ref, atol=1e-3)
    np.testing.assert_allclose(prepare(_frame(pts / 25.4, "in"), flat).points, ref, atol=1e-3)


def test_loaders_and_replay_know_their_units(tmp_path: Path) -> None:
    assert LAYOUT_UNITS == {"mvtec3d": "m", "real3d": "mm", "anomaly-shapenet": "mm"}
    assert dataset_units(FIXTURE, "mvtec3d") == "m"
    frames = list(replay_frames(FIXTURE, layout="mvtec3d", product="nut"))
    assert len(frames) == 3 and {f.meta.units for f in frames} == {"m"}
    assert {f.meta.units for f in replay_frames(FIXTURE, layout="mvtec3d", units="mm")} == {"mm"}
    # an inspectd synth dataset declares its units; an old one (no "units") was written in mm
    (tmp_path / "dataset.json").write_text(json.dumps({"generator": "inspectd tools.synth.writer"}))
    assert dataset_units(tmp_path, "mvtec3d") == "mm"
    (tmp_path / "dataset.json").write_text(json.dumps({"generator": "inspectd tools.synth.writer", "units": "m"}))
    assert dataset_units(tmp_path, "mvtec3d") == "m"


def test_eval_runs_to_the_end_on_metres_and_lists_the_unscorable_sample(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "eval"
    shutil.copytree(FIXTURE, data)
    broken = data / "nut" / "test" / "bulge" / "xyz" / "001.tiff"  # an unreadable file, too
    broken.write_bytes(b"II*\x00 not a tiff")
    (data / "nut" / "test" / "bulge" / "gt" / "001.png").write_bytes(
        (data / "nut" / "test" / "bulge" / "gt" / "000.png").read_bytes())
    assert main(["eval", "--dataset", str(data), "--layout", "mvtec3d", "--scorer", "patchcore-fpfh",
                 "--out", str(out), "--voxel-size", "2", "--scorer-param", "coreset_ratio=0.5", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["units"] == "m" and report["classes"]["nut"]["n_test"] == 4
    fails = {f["sample"]: f for f in report["failures"]}
    assert set(fails) == {"nut/test/good/xyz/001.tiff", "nut/test/bulge/xyz/001.tiff"}
    empty, unreadable = fails["nut/test/good/xyz/001.tiff"], fails["nut/test/bulge/xyz/001.tiff"]
    assert empty["stage"] == "score" and "no_finite_points" in empty["reason"]
    assert unreadable["stage"] == "load" and "DatasetError" in unreadable["reason"]
    # the worst score: a good part above every scored one, a defective one below every scored one
    with np.load(out / "scores" / "nut" / "good_000.npz") as z:
        good_score = float(z["object_score"])
    with np.load(out / "scores" / "nut" / "bulge_000.npz") as z:
        bulge_score = float(z["object_score"])
    assert empty["object_score"] > max(good_score, bulge_score)
    assert unreadable["object_score"] < min(good_score, bulge_score)
    assert report["classes"]["nut"]["i_auroc"] is not None
    md = (out / "report.md").read_text()
    assert "could not be scored: 2" in md and "nut/test/good/xyz/001.tiff" in md and "no_finite_points" in md
    again = recompute_metrics(out)
    assert again["classes"]["nut"]["i_auroc"] == pytest.approx(report["classes"]["nut"]["i_auroc"])
