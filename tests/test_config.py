"""The YAML config: defaults, validation, and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg.ingest.endpoint == "tcp://127.0.0.1:5555"
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5556"
    assert cfg.http.port == 9108


def test_valid_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("workers:\n  actors: 2\nproducts:\n  flange:\n    scorer: patchcore-fpfh\n    threshold: 0.5\n")
    cfg = load_config(p)
    assert cfg.workers.actors == 2 and cfg.products["flange"].threshold == 0.5


def test_unknown_keys_and_bad_values_are_all_listed(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("ingest:\n  queue_sise: 3\nworkers:\n  actors: -1x\ndecision:\n  review_band: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "ingest.queue_sise: unknown key" in msg
    assert "workers.actors" in msg and "decision.review_band" in msg


def test_bad_product_name_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("products:\n  'bad name!': {}\n")
    with pytest.raises(ConfigError, match="product name"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
