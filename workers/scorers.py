"""Imports every built-in scorer so that each registers itself (see ``workers.scorer.register``)."""

from workers import imrnet, patchcore, zeroshot  # noqa: F401
