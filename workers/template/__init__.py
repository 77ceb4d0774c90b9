"""The ``template`` scorer: registration onto a fused golden part and tolerance-normalized deviation."""

from workers.template.scorer import FAILED_SCORE, TemplateScorer, TemplateScoreResult

__all__ = ["FAILED_SCORE", "TemplateScoreResult", "TemplateScorer"]
