"""Imports every built-in scorer so that each registers itself (see ``workers.scorer.register``)."""

from workers import fused, fused_defects, imrnet, patchcore, template, zeroshot  # noqa: F401
