"""Typed scorer parameters: one frozen pydantic model per scorer.

Each field says when it acts: ``fit_field`` (changes what is learned: changing it needs a
re-enroll) or ``infer_field`` (only changes how a fitted model scores, e.g. a backend choice,
smoothing, thread count). The stage is in the JSON schema (``"stage": "fit" | "inference"``)
and in :meth:`ScorerParams.fields_of`. A product's config names the scorer and these parameters
(``products.<p>.scorer: {type: <name>, ...}``, see ``daemon.config``); the same model
validates them in ``enroll``, ``eval`` and when an artifact is loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stage = Literal["fit", "inference"]


def fit_field(default: Any, description: str, **constraints: Any) -> Any:
    """A parameter that changes what ``fit`` learns (a model keeps the value it was fitted with)."""
    return Field(default, description=description, json_schema_extra={"stage": "fit"}, **constraints)


def infer_field(default: Any, description: str, **constraints: Any) -> Any:
    """A parameter that only changes how a fitted model scores."""
    return Field(default, description=description, json_schema_extra={"stage": "inference"}, **constraints)


class ScorerParams(BaseModel):
    """Base of every scorer's parameter model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retired: ClassVar[frozenset[str]] = frozenset()
    """Keys that models saved by an older inspectd may carry and that mean nothing now: dropped when
    read, so those models still load (anything else unknown is refused)."""

    voxel_size: float = fit_field(1.0, "Scale of the features in mm (the preprocessing voxel size).", gt=0)

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.retired & data.keys():
            data = {k: v for k, v in data.items() if k not in cls.retired}
        return data

    @classmethod
    def fields_of(cls, stage: Stage) -> list[str]:
        """Names of the fields that act at ``stage``."""
        return [name for name, f in cls.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("stage") == stage]
