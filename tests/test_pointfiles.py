"""Scan file I/O (sensors.pointfiles): PCD in all three encodings, PLY, XYZ TIFF, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from sensors.lzf import lzf_decompress
from sensors.pointfiles import (
    PointFileError,
    read_labeled_txt,
    read_pcd,
    read_ply,
    read_scan,
    read_xyz_tiff,
    write_pcd,
    write_xyz_tiff,
)


def lzf_literal(data: bytes) -> bytes:
    """Valid LZF using literal runs only (control byte = run length - 1, at most 32 bytes)."""
    out = bytearray()
    for i in range(0, len(data), 32):
        chunk = data[i : i + 32]
        out.append(len(chunk) - 1)
        out += chunk
    return bytes(out)


def header(fields: str, size: str, typ: str, count: str | None, n: int, data: str, height: int = 1) -> bytes:
    lines = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", f"FIELDS {fields}", f"SIZE {size}", f"TYPE {typ}"]
    if count is not None:
        lines.append(f"COUNT {count}")
    lines += [f"WIDTH {n // height}", f"HEIGHT {height}", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {n}", f"DATA {data}"]
    return ("\n".join(lines) + "\n").encode()


def packed_rgb_float(rgb: np.ndarray) -> np.ndarray:
    u = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)
    return u.view(np.float32)


PTS = np.array([[0.0, 1.0, 2.0], [3.5, -4.25, 5.0], [np.nan, np.nan, np.nan], [1e-3, 2e3, -7.0]], np.float32)
RGB = np.array([[255, 0, 0], [0, 128, 0], [1, 2, 3], [10, 20, 250]], np.uint8)


# ---------------------------------------------------------------------------------------- LZF


def test_lzf_literals_and_back_references() -> None:
    assert lzf_decompress(lzf_literal(b"x" * 70), 70) == b"x" * 70
    # "abc" then a back reference of length 5 at distance 3 (overlapping copy)
    assert lzf_decompress(b"\x02abc" + bytes([(3 << 5) | 0, 2]), 8) == b"abcabcab"
    # long back reference: 7 + extra byte 3 -> length 12, distance 1
    assert lzf_decompress(b"\x00z" + bytes([7 << 5, 3, 0]), 13) == b"z" * 13
    with pytest.raises(ValueError, match="before the start"):
        lzf_decompress(bytes([(1 << 5), 5]), 3)
    with pytest.raises(ValueError, match="past the end"):
        lzf_decompress(b"\x05ab", 6)
    with pytest.raises(ValueError, match="expected"):
        lzf_decompress(lzf_literal(b"abcd"), 5)


# ---------------------------------------------------------------------------------------- PCD


@pytest.mark.parametrize("binary", [True, False])
def test_write_read_roundtrip(tmp_path: Path, binary: bool) -> None:
    labels = np.array([0, 1, 0, 1])
    p = tmp_path / "a.pcd"
    write_pcd(p, PTS, labels, binary=binary)
    assert (b"DATA binary" if binary else b"DATA ascii") in p.read_bytes()
    pts, extras = read_pcd(p)
    assert pts.dtype == np.float32 and pts.shape == (4, 3)
    np.testing.assert_array_equal(pts, PTS)  # NaN compares equal with assert_array_equal
    np.testing.assert_array_equal(extras["label"], labels)
    write_pcd(tmp_path / "b.pcd", PTS, binary=binary)  # without labels
    pts2, extras2 = read_pcd(tmp_path / "b.pcd")
    np.testing.assert_array_equal(pts2, PTS)
    assert extras2 == {}


def test_write_organized(tmp_path: Path) -> None:
    grid = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    write_pcd(tmp_path / "o.pcd", grid, np.ones((2, 3)))
    text = (tmp_path / "o.pcd").read_bytes()
    assert b"WIDTH 3\nHEIGHT 2\n" in text
    pts, _ = read_pcd(tmp_path / "o.pcd")
    np.testing.assert_array_equal(pts, grid.reshape(-1, 3))
    with pytest.raises(PointFileError, match="labels shape"):
        write_pcd(tmp_path / "bad.pcd", PTS, np.ones(3))


def test_ascii_many_fields_and_packed_rgb(tmp_path: Path) -> None:
    rgb_f = packed_rgb_float(RGB)
    rows = [
        f"{x:.9g} {y:.9g} {z:.9g} {c:.9g} 0.5 0.25 1 7 3 4"
        for (x, y, z), c in zip(PTS.tolist(), rgb_f.tolist(), strict=True)
    ]
    p = tmp_path / "rich.pcd"
    body = header("x y z rgb normal_x normal_y normal_z label hist", "4 4 4 4 4 4 4 4 2", "F F F F F F F U U",
                  "1 1 1 1 1 1 1 1 2", 4, "ascii")
    p.write_bytes(body + ("\n".join(rows) + "\n").encode())
    pts, extras = read_pcd(p)
    np.testing.assert_array_equal(pts, PTS)
    np.testing.assert_array_equal(extras["rgb"], RGB)
    assert extras["rgb"].dtype == np.uint8
    assert extras["label"].dtype == np.uint32 and extras["label"].tolist() == [7] * 4
    assert extras["hist"].shape == (4, 2) and extras["hist"].dtype == np.uint16
    np.testing.assert_allclose(extras["normal_x"], 0.5)


def test_ascii_rgb_pcl_integer_form(tmp_path: Path) -> None:
    # PCL writes an rgb field of TYPE F as its uint32 value in ascii files
    u = (RGB[:, 0].astype(np.uint32) << 16) | (RGB[:, 1].astype(np.uint32) << 8) | RGB[:, 2]
    rows = [f"1 2 3 {int(v)}" for v in u]
    p = tmp_path / "pclrgb.pcd"
    p.write_bytes(header("x y z rgb", "4 4 4 4", "F F F F", None, 4, "ascii") + "\n".join(rows).encode())
    np.testing.assert_array_equal(read_pcd(p)[1]["rgb"], RGB)


def test_binary_mixed_types_counts_and_padding(tmp_path: Path) -> None:
    n = 4
    dt = np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("_", "u1", (3,)), ("intensity", "<u2"),
                   ("rgb", "<f4"), ("ring", "<i1")])
    rec = np.zeros(n, dtype=dt)
    rec["x"], rec["y"], rec["z"] = PTS[:, 0], PTS[:, 1], PTS[:, 2]
    rec["_"] = 99
    rec["intensity"] = [10, 20, 30, 65535]
    rec["rgb"] = packed_rgb_float(RGB)
    rec["ring"] = [-1, 0, 1, 2]
    p = tmp_path / "mixed.pcd"
    p.write_bytes(header("x y z _ intensity rgb ring", "8 8 8 1 2 4 1", "F F F U U F I", "1 1 1 3 1 1 1", n, "binary")
                  + rec.tobytes())
    pts, extras = read_pcd(p)
    np.testing.assert_array_equal(pts, PTS)
    assert set(extras) == {"intensity", "rgb", "ring"}
    assert extras["intensity"].tolist() == [10, 20, 30, 65535]
    assert extras["ring"].dtype == np.int8 and extras["ring"].tolist() == [-1, 0, 1, 2]
    np.testing.assert_array_equal(extras["rgb"], RGB)


def test_binary_compressed_by_hand(tmp_path: Path) -> None:
    n = 4
    label = np.array([0, 1, 1, 0], dtype="<u4")
    # PCL's layout: all x, then all y, z, rgb, label
    columns = b"".join(
        [PTS[:, 0].astype("<f4").tobytes(), PTS[:, 1].astype("<f4").tobytes(), PTS[:, 2].astype("<f4").tobytes(),
         packed_rgb_float(RGB).astype("<f4").tobytes(), label.tobytes()]
    )
    comp = lzf_literal(columns)
    p = tmp_path / "c.pcd"
    p.write_bytes(header("x y z rgb label", "4 4 4 4 4", "F F F F U", "1 1 1 1 1", n, "binary_compressed")
                  + struct.pack("<II", len(comp), len(columns)) + comp)
    pts, extras = read_pcd(p)
    np.testing.assert_array_equal(pts, PTS)
    np.testing.assert_array_equal(extras["rgb"], RGB)
    assert extras["label"].tolist() == [0, 1, 1, 0]
    pts2, rgb2 = read_scan(p)
    np.testing.assert_array_equal(rgb2, RGB)

    # corrupt: a back reference before the start of the output
    bad = bytes([(1 << 5), 200]) + comp
    q = tmp_path / "corrupt.pcd"
    q.write_bytes(header("x y z rgb label", "4 4 4 4 4", "F F F F U", None, n, "binary_compressed")
                  + struct.pack("<II", len(bad), len(columns)) + bad)
    with pytest.raises(PointFileError, match=r"corrupt\.pcd.*corrupt binary_compressed"):
        read_pcd(q)
    # the compressed block is cut short
    r = tmp_path / "short.pcd"
    r.write_bytes(header("x y z rgb label", "4 4 4 4 4", "F F F F U", None, n, "binary_compressed")
                  + struct.pack("<II", len(comp), len(columns)) + comp[:-5])
    with pytest.raises(PointFileError, match=r"short\.pcd.*truncated"):
        read_pcd(r)


def test_binary_compressed_empty_cloud(tmp_path: Path) -> None:
    p = tmp_path / "e.pcd"
    p.write_bytes(header("x y z", "4 4 4", "F F F", None, 0, "binary_compressed") + struct.pack("<II", 0, 0))
    pts, extras = read_pcd(p)
    assert pts.shape == (0, 3) and extras == {}


GOOD_HDR = header("x y z", "4 4 4", "F F F", "1 1 1", 2, "ascii")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (GOOD_HDR.replace(b"FIELDS x y z\n", b""), "missing header line FIELDS"),
        (GOOD_HDR.replace(b"DATA ascii\n", b""), "missing header line DATA"),
        (GOOD_HDR.replace(b"POINTS 2", b"POINTS 3") + b"1 2 3\n4 5 6\n", "POINTS mismatch"),
        (GOOD_HDR + b"1 2 3\n", "truncated data"),
        (GOOD_HDR, "truncated data"),
        (GOOD_HDR + b"1 2 3\n4 five 6\n", "malformed ascii data"),
        (GOOD_HDR + b"1 2 3\n4 5 6\n7 8 9\n", "POINTS mismatch"),
        (GOOD_HDR + b"1 2 3\n4 5\n", "malformed ascii data"),
        (GOOD_HDR.replace(b"DATA ascii", b"DATA binary_lz4"), "unknown DATA kind"),
        (header("x y w", "4 4 4", "F F F", None, 2, "ascii") + b"1 2 3\n4 5 6\n", "no z field"),
        (header("x y z", "4 4", "F F F", None, 2, "ascii"), "SIZE has 2 entries but FIELDS has 3"),
        (header("x y z", "4 4 4", "F F Q", None, 2, "ascii"), "unknown TYPE"),
        (header("x y z", "4 4 3", "F F F", None, 2, "ascii"), "unsupported SIZE"),
        (header("x y z", "4 4 4", "F F F", None, 2, "binary") + b"\x00" * 20, "truncated data"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not"),
        (b"ply\nformat ascii 1.0\n", "unexpected header line"),
    ],
)
def test_malformed_pcd_names_file_and_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    p = tmp_path / "broken_scan.pcd"
    p.write_bytes(content)
    with pytest.raises(PointFileError) as info:
        read_pcd(p)
    msg = str(info.value)
    assert "broken_scan.pcd" in msg and problem in msg
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PointFileError, match="nope.pcd"):
        read_pcd(tmp_path / "nope.pcd")


# --------------------------------------------------------------------------------- TIFF, PLY


def test_xyz_tiff_zero_and_nonfinite_become_nan(tmp_path: Path) -> None:
    img = np.ones((3, 4, 3), np.float32)
    img[0, 0] = 0.0  # MVTec invalid
    img[1, 2] = [0.0, 0.0, 5.0]  # a valid point may have zero coordinates
    img[2, 3, 1] = np.inf
    tifffile.imwrite(tmp_path / "000.tiff", img, photometric="rgb")
    xyz = read_xyz_tiff(tmp_path / "000.tiff")
    assert xyz.dtype == np.float32 and xyz.shape == (3, 4, 3)
    invalid = ~np.isfinite(xyz).all(axis=2)
    assert invalid.sum() == 2 and invalid[0, 0] and invalid[2, 3]
    assert np.isnan(xyz[0, 0]).all() and np.isnan(xyz[2, 3]).all()
    np.testing.assert_array_equal(xyz[1, 2], [0, 0, 5])

    write_xyz_tiff(tmp_path / "w.tiff", xyz)
    raw = tifffile.imread(tmp_path / "w.tiff")
    assert np.isfinite(raw).all() and (raw[0, 0] == 0).all() and (raw[2, 3] == 0).all()
    np.testing.assert_array_equal(read_xyz_tiff(tmp_path / "w.tiff"), xyz)

    tifffile.imwrite(tmp_path / "gray.tiff", np.zeros((3, 4), np.float32))
    with pytest.raises(PointFileError, match=r"gray\.tiff.*H×W×3"):
        read_xyz_tiff(tmp_path / "gray.tiff")


def test_read_ply_and_dispatch(tmp_path: Path) -> None:
    ply = tmp_path / "s.ply"
    ply.write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
        "1 2 3 255 0 0\n4 5 6 0 0 255\n"
    )
    pts, rgb = read_ply(ply)
    np.testing.assert_allclose(pts, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(rgb, [[255, 0, 0], [0, 0, 255]])
    pts2, _ = read_scan(ply)
    np.testing.assert_array_equal(pts, pts2)

    empty = tmp_path / "empty.ply"
    empty.write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
                     "property float z\nend_header\n")
    with pytest.raises(PointFileError, match=r"empty\.ply"):
        read_ply(empty)
    with pytest.raises(PointFileError, match="absent.ply"):
        read_ply(tmp_path / "absent.ply")

    tifffile.imwrite(tmp_path / "x.TIF", np.ones((2, 2, 3), np.float32), photometric="rgb")
    xyz, rgb = read_scan(tmp_path / "x.TIF")
    assert xyz.shape == (2, 2, 3) and rgb is None
    write_pcd(tmp_path / "p.pcd", PTS)
    assert read_scan(tmp_path / "p.pcd")[1] is None
    with pytest.raises(PointFileError, match=r"scan\.obj.*unsupported scan file type '\.obj'"):
        read_scan(tmp_path / "scan.obj")


def test_read_labeled_txt_space_and_comma(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("0 0 0 0\n1 1 1 1\n2.5 2 2 0\n")
    (tmp_path / "b.txt").write_text("0,0,0,0.000000\n1,1,1,1.000000\n")
    pts, lab = read_labeled_txt(tmp_path / "a.txt")
    assert pts.dtype == np.float32 and lab.dtype == np.uint8 and lab.tolist() == [0, 1, 0]
    assert read_labeled_txt(tmp_path / "b.txt")[1].tolist() == [0, 1]
    (tmp_path / "c.txt").write_text("0 0 0\n")
    with pytest.raises(PointFileError, match=r"c\.txt.*at least 4 columns"):
        read_labeled_txt(tmp_path / "c.txt")


def test_reads_open3d_written_pcd_all_encodings(tmp_path: Path) -> None:
    """Cross-check against a real LZF compressor: open3d writes PCL-style binary_compressed."""
    import open3d as o3d

    rng = np.random.default_rng(5)
    xyz = np.repeat(rng.uniform(-1, 1, (50, 3)), 4, axis=0)  # repetitive -> real back references
    colors = rng.integers(0, 256, (200, 3)) / 255.0
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    cloud.colors = o3d.utility.Vector3dVector(colors)
    for kw in ({"write_ascii": True}, {}, {"compressed": True}):
        p = tmp_path / "o3d.pcd"
        assert o3d.io.write_point_cloud(str(p), cloud, **kw)
        pts, extras = read_pcd(p)
        np.testing.assert_allclose(pts, xyz, atol=1e-6)
        np.testing.assert_array_equal(extras["rgb"], np.round(colors * 255).astype(np.uint8))
    assert b"DATA binary_compressed" in p.read_bytes()
