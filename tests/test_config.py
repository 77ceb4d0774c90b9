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


def _leaf_keys(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_readme_reference_is_valid_and_complete(tmp_path: Path) -> None:
    """The README's configuration reference loads, and names every key of the schema."""
    import re

    import yaml

    from daemon.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Configuration reference.*?```yaml\n(.*?)```", readme, re.S).group(1)
    p = tmp_path / "ref.yaml"
    p.write_text(block)
    assert load_config(p) == Config()
    raw = yaml.safe_load(block)
    documented = {f"{s}.{k}" if k else s for s, v in raw.items() for k in ((v or [None]) if isinstance(v, dict) else [None])}
    assert documented == _leaf_keys(Config)
