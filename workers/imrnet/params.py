"""Parameters of the ``imrnet`` scorer (design and defaults: docs/design/imrnet.md)."""

from __future__ import annotations

from typing import Literal

from workers.params import ScorerParams, fit_field, infer_field


class IMRNetParams(ScorerParams):
    """Network sizes, fine-tuning, template and scoring choices of IMRNet (Li et al., CVPR 2024)."""

    retired = frozenset({"geometry_impl"})
    """It chose between a numpy and a torch pipeline; there is one now (torch on the scorer's device)."""

    n_points: int = fit_field(4096, "Points of the farthest-point reduction the network sees.", ge=16)
    n_centers: int = fit_field(256, "Patch centres per cloud (tokens).", ge=2)
    group_size: int = fit_field(32, "Points per patch (kNN of a centre).", ge=2)
    dim: int = fit_field(128, "Transformer width.", ge=8)
    heads: int = fit_field(4, "Attention heads.", ge=1)
    enc_depth: int = fit_field(4, "Encoder layers.", ge=1)
    dec_depth: int = fit_field(3, "Decoder layers (DFC reads layers 1-3, so at least 3).", ge=1)
    mlp_ratio: float = fit_field(4.0, "Transformer MLP width over dim.", gt=0)
    embed_hidden: int = fit_field(64, "Width of the mini-PointNet's first shared MLP.", ge=1)
    sampler: Literal["gps", "fps", "random"] = fit_field("gps", "Centre sampling: geometry-aware (Sec. 4.1), "
                                                         "farthest point or random.")
    tau: float = fit_field(0.3, "GPS: curvature-rate threshold.")
    density_ratio: float = fit_field(2.0, "GPS: candidate density over the centres wanted.", gt=0)
    mask_ratio: float = fit_field(0.4, "Fraction of patches masked per reconstruction round.", gt=0, lt=1)
    finetune_steps: int = fit_field(100, "AdamW fine-tuning steps on the product's good parts.", ge=0)
    finetune_lr: float = fit_field(5e-4, "Fine-tuning learning rate.", gt=0)
    batch_size: int = fit_field(8, "Fine-tuning batch size.", ge=1)
    finetune_samplings: int = fit_field(8, "Reductions of each good cloud used for fine-tuning.", ge=1)
    aug_rotate_deg: float = fit_field(3.0, "Fine-tuning augmentation: random rotation (degrees).", ge=0)
    aug_scale: float = fit_field(0.03, "Fine-tuning augmentation: random scale.", ge=0)
    aug_jitter: float = fit_field(0.002, "Fine-tuning augmentation: point jitter.", ge=0)
    template_samplings: int = fit_field(4, "Reductions of each good cloud in the feature template.", ge=1)
    template_quantile: float = fit_field(0.0, "Quantile of the good clouds' feature drift that is tau of the "
                                         "template regularization.", ge=0, le=1)
    point_score: Literal["patch", "knn"] = fit_field("patch", "A_p per patch (Chamfer of a patch and its "
                                                     "restoration) or per point (kNN Chamfer).")
    reference: Literal["patch", "none"] = fit_field("patch", "Scores relative to the training phase's own "
                                                    "scores of the corresponding template patch.")
    align: Literal["global", "icp", "none"] = fit_field(
        "global", "Register every cloud to the first good cloud: 'global' in any orientation (the shared "
        "registration, workers.components.registration), 'icp' only within ±10° about z, or 'none'.")
    pretrained: str = fit_field("auto", "Pretrained weights: 'auto' (the shipped ones), 'none' or a path.")
    seed: int = fit_field(0, "Seed of every random choice (reductions, centres, masks).")
    iterations: int = infer_field(3, "Rounds of Algorithm 1's iterative mask reconstruction.", ge=1)
    test_mask: Literal["cover", "random"] = infer_field(
        "cover", "Masks at test time: a permutation that masks every patch, or independent random masks.")
    template_regularization: bool = infer_field(True, "Replace restored features that drifted beyond tau "
                                                "by their template vector (Eq. 19).")
    point_k: int = infer_field(16, "Neighbours of point_score='knn'.", ge=1)
    point_weight: float = infer_field(0.5, "Weight of the standardized A_p.")
    feature_weight: float = infer_field(1.0, "Weight of the standardized A_f.")
    object_top_fraction: float = infer_field(0.01, "The object score is the mean of this top fraction of "
                                             "point scores.", gt=0, le=1)
