"""Reading and writing the scan files inspectd meets: PCD, PLY and MVTec-style XYZ TIFF.

Why our own PCD reader: the public 3D anomaly-detection datasets (Real3D-AD, Anomaly-ShapeNet)
and many industrial scanners ship PCD files in all three encodings (``ascii``, ``binary``,
``binary_compressed``) and with arbitrary extra fields (packed ``rgb``, normals, ``label``,
``intensity``, ``_`` padding). open3d silently drops fields it does not know (labels!) and gives
an empty cloud instead of an error on a broken file. ``read_pcd`` keeps every field, and a
malformed file raises :class:`PointFileError` naming the file and what is wrong.

* ``read_pcd`` / ``write_pcd``: PCD v0.6/v0.7. ``binary_compressed`` is PCL's format: after the
  ``DATA`` line, two little-endian uint32 (compressed size, uncompressed size), then an
  LZF-compressed buffer holding the fields column-wise (all x, then all y, ...), decompressed
  by ``sensors.lzf``.
  An organized PCD (HEIGHT > 1) is returned flattened in row-major order.
* ``read_ply``: via open3d (PLY has no extra fields we rely on).
* ``read_xyz_tiff`` / ``write_xyz_tiff``: H×W×3 float32 images as in MVTec 3D-AD, which store an
  invalid pixel as (0, 0, 0); in memory an invalid pixel is NaN (see ``sensors.frame``).
* ``read_scan``: dispatch on the suffix.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np

from sensors.lzf import lzf_decompress

__all__ = [
    "SCAN_SUFFIXES",
    "PointFileError",
    "read_pcd",
    "write_pcd",
    "read_ply",
    "read_xyz_tiff",
    "write_xyz_tiff",
    "read_scan",
    "read_labeled_txt",
]


class PointFileError(ValueError):
    """A scan file that cannot be read or written; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


# --------------------------------------------------------------------------------------------
# PCD
# --------------------------------------------------------------------------------------------

_PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
_REQUIRED = ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "DATA")
_DATA_KINDS = ("ascii", "binary", "binary_compressed")
_TYPE_CHAR = {"F": "f", "I": "i", "U": "u"}


def _parse_pcd_header(path: Path, raw: bytes) -> tuple[dict[str, list[str]], int]:
    """Return the header entries (key -> tokens) and the byte offset where the data starts."""
    header: dict[str, list[str]] = {}
    pos = 0
    lineno = 0
    while True:
        if pos >= len(raw):
            missing = [k for k in _REQUIRED if k not in header]
            raise PointFileError(path, f"missing header line {missing[0] if missing else 'DATA'}")
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl
        line_b = raw[pos:end]
        pos = end + 1
        lineno += 1
        try:
            line = line_b.decode("ascii").strip()
        except UnicodeDecodeError:
            raise PointFileError(path, f"header line {lineno} is not text (not a PCD file?)") from None
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        key = tokens[0].upper()
        if key not in _PCD_KEYS:
            raise PointFileError(path, f"unexpected header line {lineno}: {line[:60]!r} (not a PCD file?)")
        if key in header:
            raise PointFileError(path, f"header line {key} appears twice")
        header[key] = tokens[1:]
        if key == "DATA":
            return header, min(pos, len(raw))


def _header_ints(path: Path, header: dict[str, list[str]], key: str) -> list[int]:
    try:
        return [int(t) for t in header[key]]
    except ValueError:
        raise PointFileError(path, f"header line {key} must hold integers, got {' '.join(header[key])!r}") from None


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}__{k}")
    return out


def _unpack_rgb(values: np.ndarray, float_bits: bool) -> np.ndarray:
    """Packed 0x00RRGGBB (or AARRGGBB) colours -> N×3 uint8."""
    v = values.reshape(-1)
    if float_bits:
        u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    else:
        u = v.astype(np.uint64).astype(np.uint32)
    return np.stack([(u >> 16) & 0xFF, (u >> 8) & 0xFF, u & 0xFF], axis=1).astype(np.uint8)


def read_pcd(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a PCD file (DATA ascii, binary or binary_compressed; any FIELDS/SIZE/TYPE/COUNT).

    Returns ``(points, extras)``: ``points`` is N×3 float32 (x, y, z; NaN rows are kept, they are
    invalid points), ``extras`` maps every other field name to an N (or N×COUNT) array of the
    field's declared type. A packed colour field ``rgb``/``rgba`` (or separate ``r g b`` fields)
    becomes ``extras["rgb"]``, N×3 uint8. ``_`` padding fields are dropped; VIEWPOINT is ignored.
    An ascii ``rgb`` of TYPE F holding integers is read as the uint32 value (PCL writes it that
    way), otherwise as the float's bits (the packed-float convention).

    Raises :class:`PointFileError` (a ``ValueError``) naming the file and the problem.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PointFileError(path, f"cannot read file: {exc.strerror or exc}") from None
    header, data_start = _parse_pcd_header(path, raw)
    for key in _REQUIRED:
        if key not in header:
            raise PointFileError(path, f"missing header line {key}")

    names = header["FIELDS"]
    n_fields = len(names)
    if n_fields == 0:
        raise PointFileError(path, "header line FIELDS is empty")
    sizes = _header_ints(path, header, "SIZE")
    types = [t.upper() for t in header["TYPE"]]
    counts = _header_ints(path, header, "COUNT") if "COUNT" in header else [1] * n_fields
    for key, values in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(values) != n_fields:
            raise PointFileError(path, f"{key} has {len(values)} entries but FIELDS has {n_fields}")
    dtypes: list[np.dtype] = []
    for name, size, typ, count in zip(names, sizes, types, counts, strict=True):
        if typ not in _TYPE_CHAR:
            raise PointFileError(path, f"field {name!r} has unknown TYPE {typ!r} (expected F, I or U)")
        if size not in (1, 2, 4, 8) or (typ == "F" and size not in (4, 8)):
            raise PointFileError(path, f"field {name!r} has unsupported SIZE {size} for TYPE {typ}")
        if count < 1:
            raise PointFileError(path, f"field {name!r} has COUNT {count} (must be >= 1)")
        dtypes.append(np.dtype(f"<{_TYPE_CHAR[typ]}{size}"))
    for axis in ("x", "y", "z"):
        if axis not in names:
            raise PointFileError(path, f"no {axis} field (FIELDS: {' '.join(names)})")
        if counts[names.index(axis)] != 1:
            raise PointFileError(path, f"field {axis} has COUNT {counts[names.index(axis)]}, expected 1")

    w_h = _header_ints(path, header, "WIDTH") + _header_ints(path, header, "HEIGHT")
    if len(w_h) != 2 or min(w_h) < 0:
        raise PointFileError(path, "WIDTH and HEIGHT must be one non-negative integer each")
    width, height = w_h
    n_points = width * height
    if "POINTS" in header:
        pts = _header_ints(path, header, "POINTS")
        if len(pts) != 1 or pts[0] != n_points:
            raise PointFileError(
                path, f"POINTS mismatch: POINTS {' '.join(header['POINTS'])} but WIDTH*HEIGHT = {n_points}"
            )
    if len(header["DATA"]) != 1 or header["DATA"][0].lower() not in _DATA_KINDS:
        raise PointFileError(
            path, f"unknown DATA kind {' '.join(header['DATA'])!r} (expected one of {', '.join(_DATA_KINDS)})"
        )
    kind = header["DATA"][0].lower()
    uniq = _unique_names(names)
    record = np.dtype(
        [(u, dt) if c == 1 else (u, dt, (c,)) for u, dt, c in zip(uniq, dtypes, counts, strict=True)]
    )
    columns: dict[str, np.ndarray] = {}
    body = raw[data_start:]

    if kind == "binary":
        need = n_points * record.itemsize
        if len(body) < need:
            raise PointFileError(
                path, f"truncated data: {n_points} points need {need} bytes, file has {len(body)}"
            )
        arr = np.frombuffer(body, dtype=record, count=n_points)
        columns = {u: np.asarray(arr[u]) for u in uniq}
    elif kind == "binary_compressed":
        if len(body) < 8:
            raise PointFileError(path, "truncated data: binary_compressed size header missing")
        comp_size, raw_size = struct.unpack("<II", body[:8])
        need = n_points * record.itemsize
        if raw_size != need:
            raise PointFileError(
                path, f"binary_compressed uncompressed size {raw_size} does not match {n_points} points × "
                f"{record.itemsize} bytes = {need}"
            )
        if len(body) - 8 < comp_size:
            raise PointFileError(
                path, f"truncated data: compressed block of {comp_size} bytes, file has {len(body) - 8}"
            )
        try:
            buf = lzf_decompress(body[8 : 8 + comp_size], raw_size) if raw_size else b""
        except ValueError as exc:
            raise PointFileError(path, f"corrupt binary_compressed data: {exc}") from None
        offset = 0
        for u, dt, c in zip(uniq, dtypes, counts, strict=True):
            col = np.frombuffer(buf, dtype=dt, count=n_points * c, offset=offset)
            columns[u] = col.reshape(n_points, c) if c > 1 else col
            offset += n_points * c * dt.itemsize
    else:  # ascii
        n_cols = sum(counts)
        text = body.decode("ascii", errors="replace")
        if n_points == 0:
            table = np.zeros((0, n_cols))
        elif not text.strip():
            raise PointFileError(path, f"truncated data: header says POINTS {n_points}, found no data rows")
        else:
            try:
                table = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)
            except ValueError as exc:
                raise PointFileError(path, f"malformed ascii data: {exc}") from None
            if table.shape[0] < n_points:
                raise PointFileError(
                    path, f"truncated data: header says POINTS {n_points}, found {table.shape[0]} rows"
                )
            if table.shape[0] > n_points:
                raise PointFileError(
                    path, f"POINTS mismatch: header says POINTS {n_points}, found {table.shape[0]} rows"
                )
            if table.shape[1] != n_cols:
                raise PointFileError(
                    path, f"ascii data has {table.shape[1]} columns, FIELDS/COUNT describe {n_cols}"
                )
        col0 = 0
        for u, name, dt, c in zip(uniq, names, dtypes, counts, strict=True):
            vals = table[:, col0 : col0 + c]
            col0 += c
            vals = vals[:, 0] if c == 1 else vals
            if name in ("rgb", "rgba") and dt.kind == "f":
                finite = vals[np.isfinite(vals)]
                if finite.size and np.all((finite == np.floor(finite)) & (finite >= 0)):
                    columns[u] = vals.astype(np.uint64).astype(np.uint32)  # PCL's integer form
                    continue
            columns[u] = vals.astype(dt)

    points = np.stack([columns["x"], columns["y"], columns["z"]], axis=1).astype(np.float32)
    extras: dict[str, np.ndarray] = {}
    for u, name in zip(uniq, names, strict=True):
        if (name in ("x", "y", "z") and u == name) or name == "_":
            continue
        col = columns[u]
        if name in ("rgb", "rgba") and col.ndim == 1:
            extras["rgb"] = _unpack_rgb(col, float_bits=col.dtype.kind == "f")
            continue
        extras[u] = np.array(col)  # own the memory (not a view of the file buffer)
    if "rgb" not in extras and all(k in extras for k in ("r", "g", "b")):
        extras["rgb"] = np.stack([extras["r"], extras["g"], extras["b"]], axis=1).astype(np.uint8)
    return points, extras


def write_pcd(
    path: str | Path, points: np.ndarray, labels: np.ndarray | None = None, binary: bool = True
) -> None:
    """Write a PCD v0.7 file with fields ``x y z`` (float32) and optionally ``label`` (uint32).

    ``points`` is N×3 (HEIGHT 1) or H×W×3 (an organized cloud: WIDTH W, HEIGHT H); NaN points
    are written as NaN. ``binary=False`` writes ``DATA ascii``. Parent directories are created.
    """
    path = Path(path)
    pts = np.asarray(points)
    if not ((pts.ndim == 2 and pts.shape[1] == 3) or (pts.ndim == 3 and pts.shape[2] == 3)):
        raise PointFileError(path, f"points must be N×3 or H×W×3, got shape {pts.shape}")
    height, width = (1, pts.shape[0]) if pts.ndim == 2 else pts.shape[:2]
    xyz = pts.reshape(-1, 3).astype(np.float32)
    n = xyz.shape[0]
    lab = None
    if labels is not None:
        lab_in = np.asarray(labels)
        if lab_in.shape != pts.shape[:-1]:
            raise PointFileError(path, f"labels shape {lab_in.shape} does not match points {pts.shape[:-1]}")
        lab_flat = lab_in.reshape(-1)
        if lab_flat.size and (
            not np.all(np.isfinite(lab_flat)) or np.any(lab_flat < 0) or np.any(lab_flat != np.round(lab_flat))
        ):
            raise PointFileError(path, "labels must be non-negative integers")
        lab = lab_flat.astype(np.uint32)
    fields = "x y z" + (" label" if lab is not None else "")
    k = 4 if lab is not None else 3
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        f"FIELDS {fields}\n"
        f"SIZE {' '.join(['4'] * k)}\n"
        f"TYPE F F F{' U' if lab is not None else ''}\n"
        f"COUNT {' '.join(['1'] * k)}\n"
        f"WIDTH {width}\nHEIGHT {height}\n"
        "VIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n}\n"
        f"DATA {'binary' if binary else 'ascii'}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if binary:
        dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("label", "<u4")] if lab is not None else []))
        rec = np.empty(n, dtype=dt)
        rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        if lab is not None:
            rec["label"] = lab
        path.write_bytes(header.encode("ascii") + rec.tobytes())
    else:
        out = io.StringIO()
        out.write(header)
        if n:
            if lab is None:
                np.savetxt(out, xyz, fmt="%.9g")
            else:
                table = np.column_stack([xyz.astype(np.float64), lab.astype(np.float64)])
                np.savetxt(out, table, fmt=["%.9g", "%.9g", "%.9g", "%d"])
        path.write_text(out.getvalue(), encoding="ascii")


# --------------------------------------------------------------------------------------------
# PLY, TIFF, dispatch
# --------------------------------------------------------------------------------------------


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY point cloud via open3d: ``(points N×3 float32, rgb N×3 uint8 or None)``."""
    path = Path(path)
    if not path.is_file():
        raise PointFileError(path, "no such file")
    import open3d as o3d  # heavy import, only when a PLY is actually read

    try:
        cloud = o3d.io.read_point_cloud(str(path), format="ply")
    except Exception as exc:  # open3d raises RuntimeError on some broken files
        raise PointFileError(path, f"unreadable PLY: {exc}") from None
    if not cloud.has_points():
        raise PointFileError(path, "PLY file is empty or unreadable (open3d found no points)")
    points = np.asarray(cloud.points, dtype=np.float32)
    rgb = None
    if cloud.has_colors():
        rgb = np.clip(np.round(np.asarray(cloud.colors) * 255.0), 0, 255).astype(np.uint8)
    return points, rgb


def read_xyz_tiff(path: str | Path) -> np.ndarray:
    """Read an H×W×3 XYZ TIFF (MVTec 3D-AD) as float32; invalid pixels become NaN.

    A pixel is invalid when all three coordinates are 0 (MVTec's convention) or any is
    non-finite; all three of its coordinates are then NaN.
    """
    path = Path(path)
    import tifffile

    try:
        img = tifffile.imread(path)
    except FileNotFoundError:
        raise PointFileError(path, "no such file") from None
    except Exception as exc:
        raise PointFileError(path, f"unreadable TIFF: {exc}") from None
    if img.ndim != 3 or img.shape[2] != 3:
        raise PointFileError(path, f"expected an H×W×3 XYZ image, got shape {img.shape}")
    xyz = np.array(img, dtype=np.float32)
    invalid = np.all(xyz == 0, axis=2) | ~np.all(np.isfinite(xyz), axis=2)
    xyz[invalid] = np.nan
    return xyz


def write_xyz_tiff(path: str | Path, points: np.ndarray) -> None:
    """Write an H×W×3 XYZ image as a float32 TIFF; invalid (non-finite) pixels are written as 0."""
    path = Path(path)
    pts = np.asarray(points)
    if pts.ndim != 3 or pts.shape[2] != 3:
        raise PointFileError(path, f"points must be H×W×3, got shape {pts.shape}")
    import tifffile

    out = pts.astype(np.float32)  # a copy
    out[~np.all(np.isfinite(out), axis=2)] = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, out, photometric="rgb")  # H×W×3 contiguous, as MVTec


SCAN_SUFFIXES = (".pcd", ".ply", ".tiff", ".tif")
"""Lower-case file suffixes ``read_scan`` understands."""


def read_scan(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read any supported scan: ``(points, rgb or None)``, dispatching on the suffix.

    ``.pcd`` → N×3 (``rgb`` from a colour field if present), ``.ply`` → N×3, ``.tiff``/``.tif`` →
    H×W×3 with NaN for invalid pixels (rgb is None; MVTec's colour image is a separate PNG).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pcd":
        points, extras = read_pcd(path)
        return points, extras.get("rgb")
    if suffix == ".ply":
        return read_ply(path)
    if suffix in (".tiff", ".tif"):
        return read_xyz_tiff(path), None
    raise PointFileError(
        path, f"unsupported scan file type {suffix or '(no suffix)'!r} (expected one of {', '.join(SCAN_SUFFIXES)})"
    )


def _loadtxt_fields(path: Path, ncols_min: int) -> np.ndarray:
    """Parse a whitespace- or comma-separated numeric text table (at least ``ncols_min`` columns)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise PointFileError(path, f"cannot read file: {exc.strerror or exc}") from None
    text = re.sub(r"[,;]", " ", text)
    try:
        table = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise PointFileError(path, f"malformed text table: {exc}") from None
    if table.size and table.shape[1] < ncols_min:
        raise PointFileError(path, f"expected at least {ncols_min} columns, found {table.shape[1]}")
    return table


def read_labeled_txt(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ``x y z label`` text file (Real3D-AD ``gt/``, Anomaly-ShapeNet ``GT/``).

    Separators may be spaces, tabs or commas. Returns ``(points N×3 float32, labels N uint8)``,
    labels being 1 where the file's label is non-zero.
    """
    path = Path(path)
    table = _loadtxt_fields(path, 4)
    if table.size == 0:
        raise PointFileError(path, "no points in label file")
    labels = table[:, 3]
    if not np.all(np.isfinite(labels)):
        raise PointFileError(path, "label column holds non-finite values")
    return table[:, :3].astype(np.float32), (labels != 0).astype(np.uint8)

