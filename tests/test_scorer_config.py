"""``products.<p>.scorer``: a discriminated union over the installed scorers, read by enroll and the daemon.

Also the registry (``inspectd.scorers`` entry points) and the typed parameter models behind it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from daemon.config import Config, ProductConfig
from daemon.enrollment import enroll_scorer
from workers.registry import (
    DEFAULT_SCORER,
    available_scorers,
    build_scorer,
    builtin_scorers,
    scorer_class,
    spec_differences,
)

BUILT_IN = {"patchcore-fpfh", "template", "fused", "fused-defects", "zeroshot", "imrnet"}


def test_built_in_scorers_are_entry_points() -> None:
    assert BUILT_IN <= set(available_scorers()) and set(builtin_scorers()) == BUILT_IN
    for name in BUILT_IN:
        assert scorer_class(name).name == name
    with pytest.raises(ValueError, match="unknown scorer 'nope'; known: "):
        scorer_class("nope")


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_params_are_typed_frozen_and_split_by_stage(name: str) -> None:
    params = scorer_class(name).Params
    fit, inference = params.fields_of("fit"), params.fields_of("inference")
    assert set(fit) | set(inference) == set(params.model_fields)  # every field has a stage
    assert not set(fit) & set(inference)
    assert all(f.description for f in params.model_fields.values())
    scorer = build_scorer(name)
    with pytest.raises(ValidationError):
        scorer.hparams.voxel_size = 2.0  # type: ignore[misc]
    assert scorer_class(name)(**scorer.params()).params() == scorer.params()  # params() rebuilds it


def test_parameters_are_validated_by_the_model() -> None:
    with pytest.raises(ValueError, match="coreset_ratio"):
        build_scorer("patchcore-fpfh", {"coreset_ratio": 0})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        build_scorer("zeroshot", {"epochz": 2})
    with pytest.raises(ValueError, match="pseudo_mix"):
        build_scorer("zeroshot", {"pseudo_mix": "sideways"})


def test_plain_string_is_shorthand_and_the_dict_form_carries_parameters() -> None:
    assert ProductConfig().scorer.type == DEFAULT_SCORER
    assert ProductConfig(scorer="imrnet").scorer.type == "imrnet"
    spec = ProductConfig(scorer={"type": "zeroshot", "epochs": 2, "use_classifier": False}).scorer
    assert (spec.type, spec.epochs, spec.use_classifier, spec.width) == ("zeroshot", 2, False, 16)
    with pytest.raises(ValidationError, match="epochz"):
        ProductConfig(scorer={"type": "zeroshot", "epochz": 2})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        ProductConfig(scorer="nope")
    with pytest.raises(ValidationError, match="coreset_ratio"):
        ProductConfig(scorer={"type": "patchcore-fpfh", "coreset_ratio": -1})


def test_schema_lists_every_scorer_with_described_fields() -> None:
    schema = Config.model_json_schema()
    defs = schema["$defs"]
    spec = defs["ZeroShotScorerSpec"]
    assert spec["properties"]["epochs"]["stage"] == "fit"
    assert spec["properties"]["use_classifier"]["stage"] == "inference"
    assert spec["properties"]["epochs"]["description"]
    mapping = defs["ProductConfig"]["properties"]["scorer"]["discriminator"]["mapping"]
    assert BUILT_IN <= set(mapping)


def test_enroll_reads_the_config() -> None:
    cfg = Config(products={"a": {"scorer": {"type": "imrnet", "finetune_steps": 5}}, "b": {}})
    assert enroll_scorer(cfg, "a") == ("imrnet", {"finetune_steps": 5})
    assert enroll_scorer(cfg, "b") == (DEFAULT_SCORER, {})
    assert enroll_scorer(cfg, "unlisted") == (DEFAULT_SCORER, {})
    assert enroll_scorer(cfg, "a", "imrnet") == ("imrnet", {"finetune_steps": 5})
    assert enroll_scorer(cfg, "a", "template") == ("template", {})  # --scorer wins, with its defaults


def test_the_daemon_sees_a_model_fitted_otherwise() -> None:
    spec = ProductConfig(scorer={"type": "fused", "patchcore_weight": 0.7, "patchcore": {"coreset_ratio": 0.2}}).scorer
    meta = {"scorer": "fused", "params": build_scorer("fused", {"patchcore": {"coreset_ratio": 0.2}}).params()}
    assert spec_differences(spec, meta) == []  # an inference-time weight differs: not a refit
    meta["params"]["patchcore"]["coreset_ratio"] = 0.1
    diffs = spec_differences(spec, meta)
    assert len(diffs) == 1 and diffs[0].startswith("patchcore {") and diffs[0].endswith("configured {'coreset_ratio': 0.2}")
    assert spec_differences(spec, {"scorer": "template", "params": {}}) == ["scorer 'template', configured 'fused'"]
