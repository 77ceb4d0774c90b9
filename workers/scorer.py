"""The scorer interface every model implements, its registry, and its artifact format.

A scorer learns what good parts of one product look like (``fit``) and says how anomalous a
new part is, as one object score and one score per point (``score``). It sees clouds that
``workers.preprocess.prepare`` already cleaned (valid points, background plane removed,
voxel-downsampled); ``workers.frame_scoring`` maps its per-point scores back to every input
pixel or point. PatchCore-FPFH, IMRNet and 3DzAL all plug in here.

Artifacts are a directory holding ``model.safetensors`` (named float/int tensors) and
``meta.json`` (scorer name, version, parameters, a hash of the training data). Nothing is
pickled, so a model file from an untrusted source cannot run code when loaded.
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
from safetensors.numpy import load_file, save_file

from workers.preprocess import PreparedCloud

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


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
    backends: ClassVar[tuple[str, ...]] = ("torch-cpu",)
    """Inference backends this scorer can run on (see ``workers.backends``)."""

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

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-serializable, enough to rebuild an unfitted scorer."""

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
            "scorer": self.name,
            "version": self.version,
            "params": self.params(),
            "train_hash": train_hash,
            **(extra or {}),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return d


_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available by its ``name`` (config, CLI, artifacts)."""
    _REGISTRY[cls.name] = cls
    return cls


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class registered under ``name``; a clear error lists the known ones."""
    import workers.scorers  # noqa: F401  (registers the built-in scorers)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(_REGISTRY)}") from None


def available_scorers() -> list[str]:
    import workers.scorers  # noqa: F401

    return sorted(_REGISTRY)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The artifact's ``meta.json`` as a dict."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scorer artifact in {directory} (missing {META_FILE})")
    return json.loads(path.read_text())


def load_scorer(directory: str | Path) -> Scorer:
    """Load a fitted scorer from an artifact directory written by ``Scorer.save``."""
    meta = read_meta(directory)
    cls = scorer_class(meta["scorer"])
    tensors = load_file(str(Path(directory) / MODEL_FILE))
    return cls.from_state(meta["params"], tensors)


def hash_training_data(clouds: Sequence[PreparedCloud]) -> str:
    """SHA-256 over the training clouds' points, so an artifact names the data it came from."""
    h = hashlib.sha256()
    for c in clouds:
        h.update(np.ascontiguousarray(c.points, dtype=np.float32).tobytes())
    return h.hexdigest()
