"""What the bench measures: its frame sizes, the stages it reports under and how each measured
key maps onto one of them (the mapping is described in ``tools.bench.run``'s docstring)."""

from __future__ import annotations

SIZES = ("cloud-30k", "organized-400", "organized-1920x1200")
STAGES = ("decode", "preprocess", "features", "network", "search", "decision", "emit")
_PATCHCORE = {"features": "features", "search": "search", "smooth": "search"}
_TEMPLATE = {"registration": "search", "deviation": "search", "missing": "search", "smooth": "search"}
STAGE_OF = {
    "decode": "decode", "preprocess": "preprocess", "map_back": "emit", "decision": "decision",
    "encode_verdict": "emit", "maps": "emit", "log": "emit", "publish": "emit",
    # the daemon's hand-over of frames to the actors and of results back (tools.bench.daemon_path)
    "queue": "transport", "put": "transport", "actor_wait": "transport", "deserialize": "transport",
    "return": "transport",
    # patchcore-fpfh, and the template scorer under its own names
    **_PATCHCORE, **{k: v for k, v in _TEMPLATE.items() if k != "smooth"},
    # fused: each component's keys, prefixed; fused-defects adds its head
    **{f"patchcore_{k}": v for k, v in _PATCHCORE.items()}, **{f"template_{k}": v for k, v in _TEMPLATE.items()},
    "defect_head": "search",
    # imrnet
    "reduce": "preprocess", "sample": "preprocess", "reconstruct": "network", "dfc": "network",
    "template_search": "search", "compare": "search", "combine": "search",
    # zeroshot ("search" shared with patchcore)
    "fpfh": "features", "patches": "preprocess", "encoder": "network", "classifier": "network",
    "upsample": "search",
}
"""Measured key → issue stage (see the module docstring). Keys not listed are totals of listed
ones and not mapped: ``score`` (the scorer's), fused's ``template`` and ``patchcore`` (each
component's), the daemon's ``shadow`` (a second model's score, not this verdict's)."""


def map_stages(raw_ms: dict[str, float]) -> dict[str, float | None]:
    """Raw per-key means (ms) → the issue's stages (+ ``transport``); None where nothing maps."""
    out: dict[str, float | None] = {k: None for k in (*STAGES, "transport")}
    for key, ms in raw_ms.items():
        stage = STAGE_OF.get(key)
        if stage is not None:
            out[stage] = (out[stage] or 0.0) + ms
    return out
