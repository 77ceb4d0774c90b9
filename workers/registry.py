"""Find scorers by name: the ``inspectd.scorers`` entry-point group, and loading a saved one.

Every scorer, built-in or from another package, is an entry point of the group
``inspectd.scorers``: the entry point's name is what a config (``products.<p>.scorer.type``),
``inspectd enroll --scorer`` and a saved artifact (``meta.json`` ``scorer``) call it, and its
value is the ``Scorer`` subclass (``module:Class``). The built-in scorers are declared in this
project's ``pyproject.toml``; a plugin declares its own in its ``pyproject.toml``::

    [project.entry-points."inspectd.scorers"]
    my-scorer = "my_package.scorer:MyScorer"

and is found once it is installed in the same environment (``pip install my-package``). Entry
points live in installed package metadata; a source tree run without ``pip install -e .`` (or
installed before a scorer was added) has none for this project, so the group is then also read
from the ``pyproject.toml`` beside the ``workers`` package: the same declaration, one place.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, Field, create_model
from safetensors.numpy import load

from workers.base import MODEL_FILE, ArtifactError, Scorer, check_format, read_meta

log = logging.getLogger("inspectd.registry")

GROUP = "inspectd.scorers"
"""The entry-point group every scorer is declared in."""
DEFAULT_SCORER = "fused"
"""The scorer a product is enrolled with when neither its config nor ``enroll --scorer`` names one."""
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _source_tree_entry_points() -> list[EntryPoint]:
    """This project's own declarations, read from its ``pyproject.toml`` (source checkouts only)."""
    if not _PYPROJECT.is_file():
        return []
    project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
    declared = project.get("entry-points", {}).get(GROUP, {})
    return [EntryPoint(name, value, GROUP) for name, value in declared.items()]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for ep in _source_tree_entry_points():
        if ep.name not in found:
            found[ep.name] = ep
    return found


def available_scorers() -> list[str]:
    """Names of every installed scorer, sorted."""
    return sorted(_entry_points())


def builtin_scorers() -> list[str]:
    """Names of the scorers this project ships (its ``workers`` package), sorted; plugins excluded."""
    return sorted(name for name, ep in _entry_points().items() if ep.value.startswith("workers."))


@cache
def scorer_class(name: str) -> type[Scorer]:
    """The scorer class declared under ``name``; a clear error lists the known ones."""
    eps = _entry_points()
    if name not in eps:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(eps)}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"entry point {name!r} of {GROUP} ({eps[name].value}) is not a Scorer subclass")
    if cls.name != name:
        raise TypeError(f"entry point {name!r} of {GROUP} names {cls.__qualname__}, whose name is {cls.name!r}")
    return cls


def build_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    """An unfitted scorer ``name`` with ``params`` (validated by its parameter model)."""
    return scorer_class(name)(**(params or {}))


def load_scorer(directory: str | Path) -> Scorer:
    """Load a fitted scorer from an artifact directory written by ``Scorer.save``.

    Strict: the format version must match, ``model.safetensors`` must have the checksum in
    ``meta.json``, and the scorer must accept the whole state. Any failure is an
    ``ArtifactError`` naming the directory; nothing half-loaded is returned.
    """
    meta = read_meta(directory)
    check_format(meta, directory)
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"model artifact {directory} has no {MODEL_FILE}: re-enroll")
    return scorer_from_bytes(meta, path.read_bytes(), directory)


def scorer_from_bytes(meta: dict[str, Any], model: bytes, where: str | Path) -> Scorer:
    """Rebuild a fitted scorer from ``meta.json``'s content and the bytes of ``model.safetensors``.

    The same checks as :func:`load_scorer` (format version, checksum, whole state), for an
    artifact that arrives as bytes (a Ray actor on another node gets it through the object
    store); ``where`` names it in errors. safetensors parses the bytes: nothing is unpickled."""
    check_format(meta, where)
    cls = scorer_class(meta["scorer"])
    if hashlib.sha256(model).hexdigest() != meta.get("model_sha256"):
        raise ArtifactError(f"{where}/{MODEL_FILE} does not match the checksum in meta.json (truncated or altered): "
                            "re-enroll")
    try:
        tensors = load(bytes(model))
        return cls.from_state(meta["params"], tensors)
    except Exception as e:
        raise ArtifactError(f"model artifact {where} cannot be loaded: {type(e).__name__}: {e}") from e


def _spec_model(name: str) -> type[BaseModel]:
    """``{type: name, ...}``: the scorer's parameter model with its name as the discriminator."""
    cls = scorer_class(name)
    return create_model(f"{cls.__name__}Spec", __base__=cls.Params,
                        type=(Literal[name], Field(description=f"The {name} scorer ({cls.__qualname__}).")))


def _shorthand(value: Any) -> Any:
    """``scorer: fused`` is short for ``scorer: {type: fused}``."""
    return {"type": value} if isinstance(value, str) else value


def scorer_spec_type() -> Any:
    """The type of a config's ``scorer:``: a union over every installed scorer, discriminated by
    ``type``, each member that scorer's parameter model (so the JSON schema lists them all)."""
    members = tuple(_spec_model(name) for name in available_scorers())
    union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007 (a runtime tuple of types)
    return Annotated[union, Field(discriminator="type"), BeforeValidator(_shorthand)]


def spec_params(spec: BaseModel) -> dict[str, Any]:
    """The parameters a config's scorer spec sets explicitly (the rest keep the scorer's defaults)."""
    return spec.model_dump(mode="json", exclude_unset=True, exclude={"type"})


def spec_differences(spec: BaseModel, meta: dict[str, Any]) -> list[str]:
    """How a saved model (its ``meta.json``) differs from a configured scorer spec: another scorer,
    or a fit-time parameter set to another value. Empty: the model is what the config asks for."""
    name = spec.type  # type: ignore[attr-defined]
    if meta.get("scorer") != name:
        return [f"scorer {meta.get('scorer')!r}, configured {name!r}"]
    fit_fields = set(scorer_class(name).Params.fields_of("fit"))
    saved = meta.get("params", {})

    def same(configured: Any, fitted: Any) -> bool:  # a nested dict (fused's components) may set a few keys
        if isinstance(configured, dict) and isinstance(fitted, dict):
            return all(same(v, fitted.get(k)) for k, v in configured.items())
        return configured == fitted

    return [f"{k} {saved.get(k)!r}, configured {v!r}" for k, v in spec_params(spec).items()
            if k in fit_fields and not same(v, saved.get(k))]
