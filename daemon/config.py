"""The one configuration schema of inspectd: a YAML file, validated at start-up.

Every section refuses unknown keys, so a typo is an error at start, not a silent default.
``load_config`` turns pydantic's messages into one readable list of ``path: problem`` lines.
The README's configuration reference documents the same fields; keep them in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    max_connections: int = Field(32, ge=1)
    """Sensor connections admitted at once (each has its own receive buffer); more are refused at the handshake."""


class PublishConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB socket the daemon binds; verdict subscribers connect to it."""


class HttpConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    """Serves /metrics, /healthz and /readyz (and /v1/, unless api_port is set). 0 picks a free port."""
    api_port: int | None = Field(None, ge=0, le=65535)
    """A separate listener (same host) for the /v1/ API; None serves it on ``port``."""
    token_file: Path | None = None
    """Bearer tokens for /v1/, one ``name:token`` (or a bare token) per line; must not be
    world-readable. None: the API is open, which the daemon allows on a loopback host only."""
    metrics_auth: bool = False
    """Also require the token on /metrics, /healthz and /readyz."""
    max_body_bytes: int = Field(65536, ge=1)
    """Larger request bodies are refused with 413."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A connection that has not sent a whole request head by then is closed."""
    body_timeout_s: float = Field(10.0, gt=0)
    """A request whose body has not arrived by then is answered 408."""
    max_connections: int = Field(64, ge=2)
    """Open connections; beyond it the oldest one still waiting for its request head is closed."""
    api_threads: int = Field(4, ge=1)
    """Threads that run /v1/ calls (reload can take a while); further calls wait their turn."""


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
    node_ip: str = "127.0.0.1"
    """Address the embedded Ray's servers listen on; loopback keeps them off the network."""
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
    """Relative band around the threshold t: pass below t(1-b), fail from t(1+b), review between."""
    target_frr: float = Field(0.01, gt=0, lt=0.5)
    """False-reject rate that ``inspectd calibrate`` aims at on good parts."""


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
    """Score products without a model by the cold-start model (``<models_dir>/_zeroshot``), if present."""
    keep_frames: int = Field(64, ge=0)
    """Recent cold-start frames held in memory, so an operator can mark them good."""
    collect_dir: Path = Path("out/collected")
    """Parts marked good are written to ``<collect_dir>/<product>/good/`` for ``inspectd enroll``."""


class ProductConfig(Section):
    scorer: str = "patchcore-fpfh"
    threshold: float | None = None
    """Overrides the calibrated threshold in the product's model folder."""
    review_band: float | None = Field(None, ge=0, lt=1)


class SecurityConfig(Section):
    curve: bool = False
    """CurveZMQ on the ingest and verdict sockets: encrypted, and only allow-listed keys get in."""
    server_key: Path | None = None
    """The daemon's key pair (``inspectd keys``): the daemon reads the secret file; clients
    (sensors, replay, demo, bench) read the public key from the same path or its ``.key`` sibling."""
    allow_dir: Path | None = None
    """Allowed client public keys (``*.key``); re-read on each handshake: add or remove a file, no restart."""
    client_key: Path | None = None
    """The secret key file the sensors and subscribers started by ``inspectd`` use."""
    allow_insecure: bool = False
    """Start even when a non-loopback listener has no authentication (warns at every start)."""

    @model_validator(mode="after")
    def _curve_needs_keys(self) -> SecurityConfig:
        if self.curve and (self.server_key is None or self.allow_dir is None):
            raise ValueError("curve: true needs server_key and allow_dir (create them with 'inspectd keys')")
        return self


class Config(Section):
    ingest: IngestConfig = IngestConfig()
    publish: PublishConfig = PublishConfig()
    http: HttpConfig = HttpConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    workers: WorkersConfig = WorkersConfig()
    decision: DecisionConfig = DecisionConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    security: SecurityConfig = SecurityConfig()
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
