"""The one configuration schema of inspectd: a YAML file, validated at start-up.

Every section refuses unknown keys, so a typo is an error at start, not a silent default.
``load_config`` turns pydantic's messages into one readable list of ``path: problem`` lines.
The README's configuration reference documents the same fields; keep them in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sensors.frame import PRODUCT_NAME
from sensors.wire import DEFAULT_MAX_POINTS, MAX_HEADER_BYTES, max_message_bytes
from workers.preprocess import PreprocessParams
from workers.registry import DEFAULT_SCORER, scorer_spec_type

ScorerSpec = scorer_spec_type()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5555"
    """ZeroMQ PULL socket the daemon binds; sensors connect a PUSH socket to it."""
    queue_size: int = Field(64, ge=1)
    """Frames decoded and waiting for a worker. When full, ingest waits (backpressure)."""
    max_wait_ms: int = Field(5000, ge=0)
    """How long ingest waits for queue space before refusing a frame with reason ``overloaded``."""
    max_points: int = Field(DEFAULT_MAX_POINTS, ge=1)
    """Larger frames are refused (``too_many_points``); also sets the message-size caps."""
    receive_hwm: int = Field(2, ge=1)
    """ZeroMQ receive high-water mark per sender connection, in messages; beyond it that sender's
    sends block. Small, as each message can be ``max_points`` large."""
    max_connections: int = Field(32, ge=1)
    """Sender connections admitted at once (each has its own receive buffer); more are refused at the
    handshake. The memory bound is computed for this many."""
    max_age_ms: int = Field(10_000, ge=1)
    """A frame older than this (capture_time to dequeue) is answered ``overloaded``. Needs sensor
    clocks synchronized with the daemon's (NTP/PTP)."""
    sensors: list[str] = []
    """Sensor ids that get their own metric label value."""
    max_sensor_labels: int = Field(16, ge=0)
    """Further sensor ids labelled as first seen; every id after these is counted under ``other``."""


class PublishConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB socket the daemon binds; verdict subscribers connect to it."""
    maps: Literal["inline", "none"] = "inline"
    """Send each anomaly map with its verdict, or never (subscribers read ``map_path`` files)."""
    buffer_mb: float = Field(32.0, gt=0)
    """Bytes of verdicts queued per slow subscriber; the PUB high-water mark is derived from it and
    the largest verdict (beyond it that subscriber misses verdicts, the log keeps them)."""
    max_subscribers: int = Field(32, ge=1)
    """Subscribers the memory bound is computed for (enforced by the connection handler)."""
    error_queue: int = Field(1024, ge=1)
    """Error verdicts waiting for the emitter; scored verdicts have their own queue and go first."""


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
    maps_max_mb: float = Field(2048.0, gt=0)
    """Map files beyond this many MB are deleted, oldest first."""
    maps_max_age_days: float = Field(30.0, gt=0)
    """Map files older than this are deleted."""
    models_dir: Path = Path("models")
    """One folder per product, written by ``inspectd enroll`` and ``inspectd calibrate``."""
    data_dir: Path = Path("out")
    """Operator labels: the scans a person judged, under ``<data_dir>/labels/<product>/<good|defective>/``."""


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
    """Frames sent to one actor in one call when several are waiting (fewer Ray round trips). The
    actor scores them together only where that was measured to pay (``Scorer.batch_devices``: not
    on the CPU); elsewhere it scores them one by one."""
    batch_wait_ms: int = Field(0, ge=0)
    """How long dispatch may hold a partial batch for more frames (bounded added latency)."""
    retries: int = Field(1, ge=0)
    """How often a frame whose actor died is retried on a restarted actor before an error verdict."""
    backend: Literal["auto", "torch-cpu", "torch-cuda", "onnxruntime", "tensorrt"] = "auto"
    takt_ms: int = Field(2000, ge=1)
    """The line's takt: the scoring deadline of a frame is takt_ms + its points × ms_per_mpoint / 1e6."""
    ms_per_mpoint: int = Field(60_000, ge=0)
    """Scoring time allowed per million points on top of the takt (a frame past it: ``scoring_timeout``)."""
    large_points: int = Field(200_000, ge=1)
    """Frames with more points than this are scored on the large-frame actors, one at a time."""
    large_actors: int = Field(1, ge=0)
    """Actors kept for large frames, so they never hold up normal ones (0: large frames share the pool)."""
    large_cpus_per_actor: float = Field(0.0, ge=0)
    """Ray CPUs a large-frame actor reserves; 0 makes it an idle reserve that fits any machine."""
    large_nice: int = Field(19, ge=0, le=19)
    """CPU niceness of the large-frame actors' threads: at 19 the kernel gives normal parts the
    CPU first whenever both want it, so a 1M-point cloud slows them by little (0: equal share)."""

    def deadline_s(self, n_points: int) -> float:
        """The scoring deadline of one frame of ``n_points`` points, in seconds."""
        return (self.takt_ms + n_points * self.ms_per_mpoint / 1e6) / 1000.0


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
    plane_samples: int = Field(40_000, ge=100)
    """At most this many points fit the background plane (a pixel stride on camera frames)."""
    organized: Literal["grid", "voxel"] = "grid"
    """Camera frames: downsample by pixel blocks on the camera grid, or by voxels."""

    def params(self) -> PreprocessParams:
        return PreprocessParams(
            remove_plane=self.remove_plane, plane_distance=self.plane_distance, voxel_size=self.voxel_size,
            plane_samples=self.plane_samples, organized=self.organized,
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


class ShutdownConfig(Section):
    drain_timeout_s: float = Field(60.0, ge=0)
    """On SIGTERM, how long the daemon may take to answer every frame it has taken (ZeroMQ pipes
    included) before it exits non-zero. systemd's ``TimeoutStopSec`` must exceed it."""


class ProductConfig(Section):
    scorer: ScorerSpec = Field(default_factory=lambda: {"type": DEFAULT_SCORER}, validate_default=True)
    """The product's scorer and its parameters: ``{type: <scorer>, <param>: <value>, ...}``, any
    installed scorer (``inspectd.scorers`` entry points) with the fields of its parameter model;
    ``scorer: fused`` is short for ``{type: fused}``. ``inspectd enroll`` fits this scorer; the
    daemon warns when the model it serves was fitted with another scorer or fit-time parameters."""
    threshold: float | None = None
    """Overrides the calibrated threshold in the product's model folder."""
    review_band: float | None = Field(None, ge=0, lt=1)


class MemoryConfig(Section):
    bound_mb: float = Field(4096.0, gt=0)
    """The daemon process's memory bound. Start-up refuses a config whose worst case exceeds it."""
    baseline_mb: float = Field(800.0, gt=0)
    """The daemon's own footprint without frames (Python, numpy, Ray client, ZeroMQ)."""


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
    shutdown: ShutdownConfig = ShutdownConfig()
    security: SecurityConfig = SecurityConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    """Used by ``inspectd enroll`` for new models; a model keeps the settings it was fitted with."""
    memory: MemoryConfig = MemoryConfig()
    products: dict[str, ProductConfig] = {}
    """Products served. A product enrolled in models_dir but not listed here is served with defaults."""

    @model_validator(mode="after")
    def _memory_bound(self) -> Config:
        terms = worst_case_memory(self)
        total = sum(terms.values())
        if total > self.memory.bound_mb * 2**20:
            detail = ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in terms.items())
            raise ValueError(f"worst-case memory {total / 2**20:.0f} MB exceeds memory.bound_mb ({detail})")
        return self

    @field_validator("products")
    @classmethod
    def _product_names(cls, v: dict[str, ProductConfig]) -> dict[str, ProductConfig]:
        for name in v:
            if not PRODUCT_NAME.match(name):
                raise ValueError(f"product name {name!r} must match {PRODUCT_NAME.pattern}")
        return v


def max_verdict_bytes(cfg: Config) -> int:
    """The largest verdict message: its header, plus a map of ``max_points`` floats when inline."""
    return 2 * MAX_HEADER_BYTES + (cfg.ingest.max_points * 4 if cfg.publish.maps == "inline" else 0)


def pub_hwm(cfg: Config) -> int:
    """The PUB socket's high-water mark, in messages, from its byte budget per subscriber."""
    return max(1, int(cfg.publish.buffer_mb * 2**20) // max_verdict_bytes(cfg))


def held_frames(cfg: Config) -> int:
    """The most frames the daemon holds decoded at once: queued, in flight, in the large lane, at ingest."""
    w = cfg.workers
    actors = w.actors if isinstance(w.actors, int) else (os.cpu_count() or 1)  # auto: one per local CPU
    return cfg.ingest.queue_size + actors * w.max_inflight_per_actor * w.max_batch + 2 * w.large_actors + 1


def worst_case_memory(cfg: Config) -> dict[str, int]:
    """The daemon process's worst-case memory, term by term, in bytes (README, "Memory bound")."""
    frame = max_message_bytes(cfg.ingest.max_points)
    held = held_frames(cfg)
    return {
        "baseline": int(cfg.memory.baseline_mb * 2**20),
        "receive": cfg.ingest.max_connections * (cfg.ingest.receive_hwm + 1) * frame,
        "frames": held * frame,
        "emit": held * max_verdict_bytes(cfg) + cfg.publish.error_queue * 2 * MAX_HEADER_BYTES,
        "publish": cfg.publish.max_subscribers * pub_hwm(cfg) * max_verdict_bytes(cfg),
    }


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
