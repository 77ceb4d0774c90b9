"""Operator labels kept as data: who judged which part, when, and how; and the judged scans.

A label is a row of the ``labels`` table in the result log's SQLite file (so a verdict and
the decision a person took on it live side by side), and the part's scan goes to the label
store, a folder layout other tools read without this module::

    <data_dir>/labels/<product>/<good|defective>/<part_id>.npz   points float32 (N, 3) in mm,
                                                                 mask bool (N,) (the region, optional)
    <data_dir>/labels/<product>/<good|defective>/<part_id>.json  the label's fields

Only the valid points of a scan are stored (finite, not the all-zero "no measurement" of
organized frames); ``mask`` is aligned with them, while the label's ``region`` keeps the indices
the operator marked (into the scan's points, or pixel indices ``row * width + col`` for
organized frames). A part labelled again (a correction) replaces its earlier files; every
decision stays in the table, the newest one counts.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from daemon.maps import file_stem
from daemon.security import inside, valid_part_id, valid_product

LABELS = ("good", "defective")
FORMATS = ("jsonl", "csv")
MAX_KIND = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    verdict_id    INTEGER,
    product       TEXT NOT NULL,
    part_id       TEXT NOT NULL,
    sensor_id     TEXT,
    seq           INTEGER,
    label         TEXT NOT NULL,
    kind          TEXT,
    region_json   TEXT,
    user          TEXT NOT NULL,
    at            REAL NOT NULL,
    model_version TEXT,
    object_score  REAL,
    scan          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_product_at ON labels (product, at);
CREATE INDEX IF NOT EXISTS labels_part ON labels (product, part_id);
CREATE INDEX IF NOT EXISTS labels_verdict ON labels (verdict_id);
"""


@dataclass
class Label:
    """One operator decision on one part."""

    product: str
    part_id: str
    sensor_id: str | None
    seq: int | None
    label: str
    """``good`` or ``defective``."""
    kind: str | None
    """The defect kind the operator chose (defective only), e.g. ``dent``."""
    region: list[int] | None
    """Marked indices: into the scan's points, or pixels ``row * width + col`` of an organized frame."""
    user: str
    """The name of the bearer token that sent the decision (``anonymous`` without auth)."""
    at: float
    """Unix time of the decision."""
    model_version: str | None
    object_score: float | None
    scan: str = ""
    """Path of the stored scan (the npz); set by ``LabelStore.add``."""

    def check(self) -> None:
        """Refuse what must not reach the store or the file system (ValueError)."""
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {self.label!r}")
        if not valid_product(self.product):
            raise ValueError(f"{self.product!r} is not a valid product name")
        if not valid_part_id(self.part_id):
            raise ValueError(f"{self.part_id!r} is not a valid part id")
        if self.kind is not None and (self.label != "defective" or not self.kind.strip() or len(self.kind) > MAX_KIND):
            raise ValueError(f"a defect kind goes with a defective label only, 1-{MAX_KIND} characters")
        if self.region is not None and (self.label != "defective" or not all(isinstance(i, int) and i >= 0
                                                                            for i in self.region)):
            raise ValueError("a region goes with a defective label only, as non-negative point or pixel indices")


class LabelStore:
    """The ``labels`` table of the result log (``results_db_path``) and the scans under ``store_dir``
    (``<storage.data_dir>/labels``). Safe to share between threads (one lock, its own connection)."""

    def __init__(self, results_db_path: str | Path, store_dir: str | Path) -> None:
        self.root = Path(store_dir)
        Path(results_db_path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(results_db_path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)
        self.lock = threading.Lock()

    def add(self, label: Label, points: np.ndarray, verdict_id: int | None = None) -> Label:
        """Store the scan (valid points in mm, the region as a mask), then commit the row; returns
        the label with ``scan`` set. ``points`` is (N, 3), or (H, W, 3) for an organized frame."""
        label.check()
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        if label.region and max(label.region) >= len(pts):
            raise ValueError(f"region index {max(label.region)} is outside the scan's {len(pts)} points")
        valid = np.isfinite(pts).all(axis=1) & np.any(pts != 0, axis=1)
        folder = inside(self.root, label.product, label.label)
        folder.mkdir(parents=True, exist_ok=True)
        stem = file_stem(label.part_id)
        npz = inside(folder, f"{stem}.npz")
        arrays: dict[str, np.ndarray] = {"points": pts[valid]}
        if label.region:
            mask = np.zeros(len(pts), dtype=bool)
            mask[np.asarray(label.region, dtype=np.int64)] = True
            arrays["mask"] = mask[valid]
        for other in LABELS:  # a correction: the part is no longer under its earlier label
            if other != label.label:
                for suffix in (".npz", ".json"):
                    inside(self.root, label.product, other, stem + suffix).unlink(missing_ok=True)
        np.savez_compressed(npz, **arrays)
        label.scan = str(npz)
        inside(folder, f"{stem}.json").write_text(json.dumps(asdict(label), indent=1))
        with self.lock:
            self.conn.execute(
                "INSERT INTO labels (verdict_id, product, part_id, sensor_id, seq, label, kind, region_json, user, at,"
                " model_version, object_score, scan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (verdict_id, label.product, label.part_id, label.sensor_id, label.seq, label.label, label.kind,
                 json.dumps(label.region) if label.region is not None else None, label.user, label.at,
                 label.model_version, label.object_score, label.scan),
            )
        return label

    def list(self, product: str | None = None, label: str | None = None, since: float | None = None) -> list[Label]:
        """Every decision (corrections included), oldest first, optionally one product's, one label's,
        or those taken at or after ``since`` (unix time)."""
        where, args = ["1 = 1"], []
        for column, value in (("product = ?", product), ("label = ?", label), ("at >= ?", since)):
            if value is not None:
                where.append(column)
                args.append(value)
        with self.lock:
            rows = self.conn.execute(
                "SELECT product, part_id, sensor_id, seq, label, kind, region_json, user, at, model_version,"
                f" object_score, scan FROM labels WHERE {' AND '.join(where)} ORDER BY id", args,
            ).fetchall()
        return [Label(*r[:6], json.loads(r[6]) if r[6] else None, *r[7:]) for r in rows]

    def export(self, fmt: str = "jsonl", product: str | None = None, label: str | None = None,
               since: float | None = None) -> str:
        """The decisions as JSON lines or CSV (the region as a JSON list in one column)."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
        labels = self.list(product, label, since)
        if fmt == "jsonl":
            return "".join(json.dumps(asdict(x)) + "\n" for x in labels)
        buf = io.StringIO()
        names = [f.name for f in fields(Label)]
        w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for x in labels:
            row: dict[str, Any] = asdict(x)
            row["region"] = json.dumps(x.region) if x.region is not None else ""
            w.writerow(row)
        return buf.getvalue()

    def close(self) -> None:
        with self.lock:
            self.conn.close()
