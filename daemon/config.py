"""The one configuration schema of inspectd: a YAML file, validated at start-up.

Every section refuses unknown keys, so a typo is an error at start, not a silent default.
``load_config`` turns pydantic's messages into one readable list of ``path: problem`` lines.
The README's configuration reference documents the same fields; keep them in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sensors.frame import PRODUCT_NAME
from workers.preprocess import PreprocessParams


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5555"
    """ZeroMQ PULL socket the daemon binds; sensors connect a PUSH socket to it."""
    queue_size: int = Field(64, ge=1)
    """Frames decoded and waiting for a worker. When full, ingest waits (backpressure)."""
    max_wait_ms: int = Field(5000, ge=0)
    """How long ingest waits for queue space before refusing a frame with reason ``overloaded``."""
    max_points: int = Field(5_000_000, ge=1)
    receive_hwm: int = Field(16, ge=1)
    """ZeroMQ receive high-water mark, in messages; beyond it the sensors' sends block."""


class PublishConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB socket the daemon binds; verdict subscribers connect to it."""


class HttpConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    """Serves /metrics, /healthz and /readyz. 0 picks a free port (printed at start)."""


class StorageConfig(Section):
    results: Path = Path("out/results.sqlite")
    """SQLite result log (WAL); each verdict is committed before it is published."""
    maps_dir: Path = Path("out/maps")
    maps: Literal["all", "flagged", "none"] = "flagged"
    """Which anomaly maps to write: every part, only fail/review/error, or none."""
    models_dir: Path = Path("models")
    """One folder per product, written by ``inspectd enroll`` and ``inspectd calibrate``."""


class RayConfig(Section):
    address: str | None = None
    """None starts an embedded local Ray; ``auto`` or ``ray://host:10001`` joins a cluster."""
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int = Field(512, ge=64)


class WorkersConfig(Section):
    actors: int | Literal["auto"] = "auto"
    """Number of scoring actors; auto = the cluster's CPUs (or GPUs) / what one actor asks."""
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    threads_per_actor: int = Field(1, ge=1)
    max_inflight_per_actor: int = Field(1, ge=1)
    """Frames sent to one actor before it answers; 1 keeps waiting frames in the daemon's queue."""
    max_batch: int = Field(4, ge=1)
    """Frames sent to one actor in one call when several are waiting (fewer Ray round trips)."""
    batch_wait_ms: int = Field(0, ge=0)
    """How long dispatch may hold a partial batch for more frames (bounded added latency)."""
    retries: int = Field(1, ge=0)
    """How often a frame whose actor died is retried on a restarted actor before an error verdict."""
    backend: Literal["auto", "torch-cpu", "torch-cuda", "onnxruntime", "tensorrt"] = "auto"


class DecisionConfig(Section):
    review_band: float = Field(0.1, ge=0, lt=1)
    """Band b around the threshold t, relative to its distance from the good-part median m: pass
    below t - b(t - m), fail from t + b(t - m), review between (any score domain; docs/decision.md)."""
    target_frr: float = Field(0.01, gt=0, lt=0.5)
    """False-reject rate that ``inspectd calibrate`` aims at on good parts; it needs at least
    ``daemon.decision.min_parts(target_frr)`` calibration parts (9 at 0.01)."""


class PreprocessConfig(Section):
    remove_plane: bool = True
    plane_distance: float = Field(0.8, gt=0)
    voxel_size: float = Field(1.0, ge=0)

    def params(self) -> PreprocessParams:
        return PreprocessParams(
            remove_plane=self.remove_plane, plane_distance=self.plane_distance, voxel_size=self.voxel_size
        )


class ColdStartConfig(Section):
    enabled: bool = True
    """Score products without a model by the cold-start model (``<models_dir>/_zeroshot``), if present:
    only products listed under ``products:`` or matching ``cold_start.products``; any other name
    without a model is refused with ``unknown_product``."""
    products: list[str] = []
    """Names or shell-style patterns (``fnmatch``, e.g. ``bracket-*``) of products the cold-start
    model may score, in addition to the products listed under ``products:``."""
    pass_fail: list[str] = []
    """Names or patterns of cold-start products whose verdicts may be pass / fail. Every other
    cold-start verdict is ``review`` (with its map): the cold-start model ranks parts below
    chance on some products (docs/results/zeroshot.md)."""
    keep_frames: int = Field(64, ge=0)
    """Recent cold-start frames held in memory, so an operator can mark them good."""
    collect_dir: Path = Path("out/collected")
    """Parts marked good are written to ``<collect_dir>/<product>/good/`` for ``inspectd enroll``."""


class ProductConfig(Section):
    scorer: str = "patchcore-fpfh"
    threshold: float | None = None
    """Overrides the calibrated threshold in the product's model folder."""
    review_band: float | None = Field(None, ge=0, lt=1)


class Config(Section):
    ingest: IngestConfig = IngestConfig()
    publish: PublishConfig = PublishConfig()
    http: HttpConfig = HttpConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    workers: WorkersConfig = WorkersConfig()
    decision: DecisionConfig = DecisionConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    """Used by ``inspectd enroll`` for new models; a model keeps the settings it was fitted with."""
    products: dict[str, ProductConfig] = {}
    """Products served. A product enrolled in models_dir but not listed here is served with defaults."""

    @field_validator("products")
    @classmethod
    def _product_names(cls, v: dict[str, ProductConfig]) -> dict[str, ProductConfig]:
        for name in v:
            if not PRODUCT_NAME.match(name):
                raise ValueError(f"product name {name!r} must match {PRODUCT_NAME.pattern}")
        return v


class ConfigError(ValueError):
    """The config file cannot be used; the message lists every problem."""


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config (None: all defaults). Relative paths stay relative to the cwd."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"{p} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None
