"""Parameters of the ``zeroshot`` scorer (3DzAL; design and defaults: docs/design/zeroshot.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from workers.params import ScorerParams, fit_field, infer_field


def parse_mix(mix: str | float) -> float:
    """``pseudo_mix`` → the fraction of adding-point pseudo anomalies."""
    if isinstance(mix, str):
        named = {"adding": 1.0, "removing": 0.0, "both": 0.5}
        if mix in named:
            return named[mix]
        try:
            mix = float(mix)
        except ValueError:
            raise ValueError(f"pseudo_mix must be 'adding', 'removing', 'both' or a ratio in [0, 1], got {mix!r}") from None
    m = float(mix)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"pseudo_mix ratio must be in [0, 1], got {m}")
    return m


class ZeroShotParams(ScorerParams):
    """Patches, pseudo anomalies, training, memory bank and score fusion of 3DzAL (Wang et al.)."""

    retired = frozenset({"geometry_impl"})
    """It chose between a numpy and a torch pipeline; there is one now (torch on the scorer's device)."""

    # patches (Sec. 3, Sec. 4 "Implementation details")
    patch_points: int = fit_field(64, "Voxels per patch (nearest to its centre).", ge=4)
    patch_mode: Literal["auto", "organized", "unorganized"] = fit_field(
        "auto", "Patches from the camera grid (28x28 cells), from FPS centres of a cloud, or by the frame's kind.")
    min_cell_pixels: int = fit_field(8, "An organized cell with fewer part pixels makes no patch.", ge=0)
    crop_to_part: bool = fit_field(True, "Organized frames: resize the part's bounding window, not the whole image.")
    unorganized_patches: int = fit_field(784, "Most FPS patch centres of an unorganized cloud.", ge=1)
    patch_scale: Literal["patch", "fixed"] = fit_field("fixed", "Patch points scaled per patch or by one fixed "
                                                       "product scale.")
    fpfh_pool: Literal["cell", "patch"] = fit_field("cell", "FPFH pooled over an organized cell or over the patch.")
    normal_radius_factor: float = fit_field(2.0, "Normal estimation radius, in voxels.", gt=0)
    feature_radius_factor: float = fit_field(5.0, "FPFH radius, in voxels.", gt=0)
    # pseudo anomalies (Sec. 3.2)
    poi_percent: float = fit_field(0.1, "Points of interest: top percent of the ResNet activation.", gt=0, le=100)
    poi_max_sources: int = fit_field(24, "Most task-irrelevant samples the POIs come from.", ge=1)
    pseudo_mix: str | float = fit_field(0.5, "Fraction of adding-point pseudo anomalies: a ratio in [0, 1] or "
                                        "'adding', 'removing', 'both'.")
    part_points: int = fit_field(24, "Points of an added POI part.", ge=1)
    remove_ratio_min: float = fit_field(0.25, "Removing-point: least fraction of a patch cut out.", ge=0, lt=1)
    remove_ratio_max: float = fit_field(0.6, "Removing-point: largest fraction of a patch cut out.", ge=0, lt=1)
    rotate_parts: bool = fit_field(True, "Rotate added POI parts randomly.")
    negative_ratio: float = fit_field(1.0, "Pseudo-abnormal patches per normal patch.", gt=0)
    # training (Sec. 3.3)
    max_train_patches: int = fit_field(2048, "Most normal training patches (and as many pseudo-abnormal).", ge=1)
    epochs: int = fit_field(8, "Training epochs of f_theta and g_phi.", ge=0)
    batch_positives: int = fit_field(64, "Normal patches per batch.", ge=1)
    lr: float = fit_field(1e-3, "Adam learning rate.", gt=0)
    temperature: float = fit_field(0.07, "Contrastive loss temperature.", gt=0)
    contrastive_weight: float = fit_field(1.0, "Weight of the patch-level contrastive loss (lambda_1).", ge=0)
    disentangle_weight: float = fit_field(100.0, "Weight of the disentanglement loss against FPFH (lambda_2).", ge=0)
    disentangle_centered: bool = fit_field(False, "Centre the features before the disentanglement cosine.")
    disentangle_warmup: float = fit_field(0.5, "Fraction of training before the disentanglement loss acts.", ge=0)
    width: int = fit_field(16, "PointNet++ width.", ge=1)
    use_learned: bool = fit_field(True, "Put the learned feature f_theta in the memory bank.")
    rgb_checkpoint: str | None = fit_field(None, "Local ImageNet ResNet-50 checkpoint for the RGB branch (off if unset).")
    checkpoint_dir: str | None = fit_field(None, "Where fit keeps the trained networks for reuse.")
    # memory bank (Sec. 3.3)
    coreset_ratio: float = fit_field(0.1, "Fraction of the patch features kept by the greedy coreset.", gt=0)
    coreset_max: int = fit_field(20000, "Most features the memory bank keeps.", ge=1)
    coreset_projection_dim: int = fit_field(128, "Features wider than this are projected for the coreset.", ge=1)
    learned_weight: float = fit_field(1.0, "Scale of the learned block in the memory bank.")
    seed: int = fit_field(0, "Seed of every random choice of fit.")
    # scoring (Sec. 3.4)
    use_classifier: bool = infer_field(True, "Add the normalcy classifier's score (Eq. 8-10).")
    use_perturbation: bool = infer_field(True, "Perturb patches along g_phi's gradient before classifying (Eq. 8).")
    perturbation_epsilon: float = infer_field(0.1, "Step of the perturbation (epsilon).")
    perturbation_direction: Literal["lower", "raise"] = infer_field("lower", "Direction of the perturbation step.")
    distance_weight: float = infer_field(1.0, "Weight of the distance score (lambda_d).")
    classifier_weight: float = infer_field(1.0, "Weight of the classification score (lambda_c).")
    reweight_neighbors: int = infer_field(3, "Bank neighbours of PatchCore's reweighting.", ge=0)
    blur_sigma: float = infer_field(4.0, "Gaussian blur of organized patch maps (Eq. 7), in pixels.", ge=0)
    cloud_blur_k: int = infer_field(16, "Unorganized clouds: neighbours of the map blur.", ge=0)
    cloud_blur_sigma_factor: float = infer_field(2.0, "Unorganized clouds: blur sigma, in voxels.", ge=0)
    torch_threads: int = infer_field(1, "torch intra-op threads inside fit and score (<= 0: leave them).")

    @field_validator("pseudo_mix")
    @classmethod
    def _mix(cls, v: str | float) -> str | float:
        parse_mix(v)
        return v if isinstance(v, str) else float(v)

    @model_validator(mode="after")
    def _remove_ratios(self) -> ZeroShotParams:
        if self.remove_ratio_min > self.remove_ratio_max:
            raise ValueError("need remove_ratio_min <= remove_ratio_max")
        return self
