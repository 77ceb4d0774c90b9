"""The scorer interface every model implements, and its artifact format.

A scorer learns what good parts of one product look like (``fit``) and says how anomalous a
new part is, as one object score and one score per point (``score``). It sees clouds that
``workers.preprocess.prepare`` already cleaned (valid points, background plane removed,
voxel-downsampled); ``workers.score_frame`` maps its per-point scores back to every input
pixel or point. PatchCore-FPFH, IMRNet, 3DzAL and scorers from other packages all plug in here;
``workers.registry`` finds them by name.

Artifacts are a directory holding ``model.safetensors`` (named float/int tensors) and
``meta.json`` (artifact ``format_version``, scorer name, version, parameters, a hash of the
training data, the SHA-256 of ``model.safetensors``). Nothing is pickled, so a model file from
an untrusted source cannot run code when loaded. Loading is strict: a wrong format version, a
file whose checksum does not match (truncated, altered) or a state the scorer does not fully
accept raises ``ArtifactError`` and nothing is returned half-loaded.

Each scorer declares its ``score_domain`` (``"nonnegative"`` for distances, ``"real"`` for
standardized scores) so that calibration can refuse scores outside it.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import save_file

from workers.params import ScorerParams
from workers.preprocess import PreparedCloud

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 2
"""Artifact format this code writes and reads. 1: no ``format_version`` key, no checksum, no
per-part training hashes, unversioned model folders (``inspectd models migrate`` upgrades it)."""
MIGRATE_HINT = "run `inspectd models migrate <models_dir>` to upgrade it"


class ArtifactError(ValueError):
    """A model artifact cannot be loaded (format version, checksum, state); the message says why."""


@dataclass
class ScoreResult:
    """What a scorer says about one part."""

    object_score: float
    point_scores: np.ndarray
    """float32, one score per point of ``PreparedCloud.points`` (higher = more anomalous)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per internal stage (e.g. ``features``, ``search``), for metrics and bench."""


class Scorer(ABC):
    """Fit on good parts of one product, then score parts of that product."""

    name: ClassVar[str]
    version: ClassVar[str]
    allow_random_init: bool = False
    """A learned scorer whose pretrained weights are missing raises in ``fit`` unless this is set
    (``inspectd enroll --allow-random-init``); it is a fit-time choice, not saved."""
    score_domain: ClassVar[str] = "nonnegative"
    """Where object scores live: ``"nonnegative"`` (distances) or ``"real"`` (may be negative)."""
    backends: ClassVar[tuple[str, ...]] = ("torch-cpu",)
    """Inference backends this scorer can run on (see ``workers.backends``)."""
    preprocess_overrides: ClassVar[dict[str, Any]] = {}
    """``PreprocessParams`` fields this scorer is always enrolled and evaluated with, whatever the
    config says (a model keeps its preprocessing, so it is served with them too)."""

    Params: ClassVar[type[ScorerParams]] = ScorerParams
    """The scorer's parameter model (``workers.params``): validates the constructor's keywords."""

    def __init__(self, **params: Any) -> None:
        self.hparams = self.Params(**params)

    def __getattr__(self, name: str) -> Any:
        """A parameter reads as an attribute (``self.voxel_size``); only called for names not set."""
        hparams = self.__dict__.get("hparams")
        if hparams is not None and name in type(hparams).model_fields:
            return getattr(hparams, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    batch_devices: ClassVar[tuple[str, ...]] = ()
    """Device types (``"cpu"``, ``"cuda"``) where ``score_many`` shares work over a batch and was
    measured to pay (``inspectd bench --batch``). Elsewhere the worker scores a batch part by part
    (``batches`` is False), so ``workers.max_batch`` only saves Ray round trips there."""

    @property
    def batches(self) -> bool:
        """Whether a batch of parts is scored with ``score_many`` on this scorer's device."""
        device = str(getattr(self, "device", "cpu")).split(":")[0]
        return device in self.batch_devices

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[ScoreResult]:
        """Score several parts, results in order. The default scores them one by one; a scorer
        that can share work over a batch (one bank search over every part's features) overrides it.
        One part's failure fails the call: the caller falls back to ``score`` per part."""
        return [self.score(c) for c in clouds]

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Move inference to ``backend`` (one of ``backends``, already checked to be available)."""
        if backend not in self.backends:
            raise ValueError(f"{self.name} cannot run on {backend!r}; it supports {list(self.backends)}")

    @abstractmethod
    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        """Learn the product's normal appearance from good parts only."""

    @abstractmethod
    def score(self, cloud: PreparedCloud) -> ScoreResult:
        """Score one part; ``point_scores`` is aligned to ``cloud.points``."""

    def params(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-serializable, enough to rebuild an unfitted scorer."""
        return self.hparams.model_dump(mode="json")

    @abstractmethod
    def tensors(self) -> dict[str, np.ndarray]:
        """The fitted state as named arrays, for ``model.safetensors``."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> Scorer:
        """Rebuild a fitted scorer from ``params()`` and ``tensors()``."""

    def save(self, directory: str | Path, train_hash: str, extra: dict[str, Any] | None = None) -> Path:
        """Write the artifact (``model.safetensors`` + ``meta.json``) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors().items()}
        save_file(tensors, str(d / MODEL_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "model_sha256": file_sha256(d / MODEL_FILE),
            "scorer": self.name,
            "version": self.version,
            "params": self.params(),
            "train_hash": train_hash,
            **(extra or {}),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The artifact's ``meta.json`` as a dict (any format version)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scorer artifact in {directory} (missing {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): the artifact is damaged; re-enroll") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a JSON object: the artifact is damaged; re-enroll")
    return meta


def check_format(meta: dict[str, Any], directory: str | Path) -> None:
    """Raise ``ArtifactError`` unless ``meta`` is of the format this code reads."""
    version = meta.get("format_version", 1)
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise ArtifactError(f"model artifact {directory} has format version {version}, this inspectd reads "
                            f"{FORMAT_VERSION}: {MIGRATE_HINT}")
    raise ArtifactError(f"model artifact {directory} has format version {version!r}, this inspectd reads "
                        f"{FORMAT_VERSION}: it was written by a newer inspectd; upgrade inspectd or re-enroll")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def part_hash(points: np.ndarray) -> str:
    """SHA-256 of one part's raw points (as received), so calibration can spot a training part."""
    return hashlib.sha256(np.ascontiguousarray(points, dtype=np.float32).tobytes()).hexdigest()


def hash_training_data(clouds: Sequence[PreparedCloud]) -> str:
    """SHA-256 over the training clouds' points, so an artifact names the data it came from."""
    h = hashlib.sha256()
    for c in clouds:
        h.update(np.ascontiguousarray(c.points, dtype=np.float32).tobytes())
    return h.hexdigest()
