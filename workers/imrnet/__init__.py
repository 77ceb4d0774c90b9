"""IMRNet (Li et al., CVPR 2024): geometry-aware sampling, masked point-patch reconstruction,
iterative restoration and dense feature comparison, as the ``imrnet`` scorer.

Modules: ``sampling`` (GPS / FPS / random, Sec. 4.1; patch grouping, Eq. 8), ``network``
(Point-MAE-style PMR network, Sec. 4.2), ``training`` (pretraining on the synthetic part library
and fine-tuning, Sec. 5.3), ``scorer`` (Algorithm 1 + DFC, Sec. 4.3), ``onnx_export``.
"""

from workers.imrnet.scorer import IMRNetScorer

__all__ = ["IMRNetScorer"]
