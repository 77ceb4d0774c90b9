"""3DzAL: zero-shot 3D anomaly localization (Wang et al., "Towards Zero-shot 3D Anomaly
Localization"), registered as the ``zeroshot`` scorer. See ``workers.zeroshot.scorer``."""

from workers.zeroshot.scorer import ZeroShotScorer

__all__ = ["ZeroShotScorer"]
