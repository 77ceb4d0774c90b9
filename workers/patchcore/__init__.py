"""PatchCore over FPFH (``patchcore-fpfh``), the BTF baseline: ``torch_model`` holds the fitted
memory bank as an ``nn.Module`` and searches it; ``scorer`` computes FPFH, fits the coreset and
maps scores back to points. Design: docs/design/patchcore-fpfh.md.
"""

from workers.patchcore.scorer import FPFH_IMPLS, PatchCoreFPFHScorer, fpfh_features, greedy_coreset
from workers.patchcore.torch_model import PatchCoreModel

__all__ = ["FPFH_IMPLS", "PatchCoreFPFHScorer", "PatchCoreModel", "fpfh_features", "greedy_coreset"]
