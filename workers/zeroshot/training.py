"""Training of 3DzAL's two PointNet++ networks and the test-time input perturbation.

* **Patch-level contrastive loss** (Sec. 3.2, Eq. 1), temperature τ = 0.07: normal patches are
  the positives P, pseudo-abnormal patches the negatives N. Our reading of Eq. 1 (a supervised
  contrastive loss with the positives as anchors)::

      L_con = −1/|P| Σ_{i∈P} 1/|P∖i| Σ_{j∈P∖i} log( exp(z_i·z_j/τ) / Σ_{a∈(P∪N)∖i} exp(z_i·z_a/τ) )

  with z = f_θ(x)/‖f_θ(x)‖: it pulls the normal patches together and pushes the negatives away
  from all of them.
* **Representation disentanglement loss** (Eq. 2): the cosine similarity between the learned
  feature f_θ(x) and the FPFH feature of the same patch is minimized. Choices: the learned
  feature has the FPFH's 33 dimensions so that the cosine is defined without a projection (the
  paper's is 32-D); we minimize the *squared* cosine (an anti-aligned feature would carry the
  same information as an aligned one, and minimizing the signed cosine drives f_θ to −FPFH);
  the FPFH is the patch's raw mean FPFH, as the paper writes (``disentangle_centered=True`` in
  the scorer subtracts the training mean first); it is applied to the normal patches only (the FPFH of a
  pseudo-abnormal patch would need the FPFH of a modified cloud). Total: λ1·L_con + λ2·L_dis,
  λ1 = 1, λ2 = 100, with λ2 ramped linearly from 0 over the first ``disentangle_warmup`` = 50 %
  of the steps. Why the warm-up (measured on synthetic parts, 8 epochs): with λ2 = 100 from the
  first step the encoder collapses at once to a constant vector orthogonal to every FPFH
  (L_dis ≈ 0) and L_con stays at log(B − 1) = 4.84, its value for identical features, for the
  whole run, with |cos| or cos², raw or centred FPFH alike; with λ2 = 0 or the warm-up L_con
  falls to ~4.35 (its optimum for 64 + 64 patches is log 63 = 4.14) while L_dis ends ≈ 0.
* **Normalcy classifier** (Sec. 3.3, Eq. 3): a second PointNet++, 2-way softmax, class 1 =
  abnormal, trained with the binary cross-entropy on the same positive / negative patches.
* Adam (lr 1e-3), the last epoch's weights are kept (as the paper). Seeded: the networks are
  initialized and the batches drawn from ``seed`` inside ``torch.random.fork_rng`` (the global
  torch RNG is left alone). Optional per-epoch checkpoints as safetensors.
* **Input perturbation** (Sec. 3.4, Eq. 8), ε = 0.1 on the normalized patch coordinates:
  ŷ = argmax g_φ(x), L = −log S_ŷ(x), and the paper's text says the perturbation "seeks to lower
  the softmax score of the class predicted with the highest likelihood", i.e.
  x̃ = x + ε·sign(∇_x L) (``direction="lower"``, the default). ``direction="raise"`` is ODIN's
  x̃ = x − ε·sign(∇_x L) (raises S_ŷ), kept for the ablation because the equation itself is lost
  in our copy of the paper. The classification score is S_abnormal(x̃) (Eq. 9–10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.zeroshot.pointnet2 import PointNet2

__all__ = [
    "TrainConfig",
    "supcon_loss",
    "disentanglement_loss",
    "train_networks",
    "encode",
    "perturb",
    "abnormal_probability",
]


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_positives: int = 64
    lr: float = 1e-3
    temperature: float = 0.07
    contrastive_weight: float = 1.0
    disentangle_weight: float = 100.0
    disentangle_warmup: float = 0.5
    feature_dim: int = 33
    width: int = 16
    seed: int = 0


def supcon_loss(z: torch.Tensor, positive: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Eq. 1 on L2-normalized features ``z`` (B×D); ``positive`` (B,) marks the normal patches."""
    pos = positive.bool()
    n_pos = int(pos.sum())
    if n_pos < 2:
        return z.sum() * 0.0
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pair = pos[:, None] & pos[None, :] & ~eye
    per_anchor = log_prob.masked_fill(~pair, 0.0).sum(dim=1) / (n_pos - 1)
    return -per_anchor[pos].mean()


def disentanglement_loss(f: torch.Tensor, fpfh: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean cos²(f_θ(x), FPFH(x))."""
    return F.cosine_similarity(f, fpfh, dim=1, eps=1e-8).square().mean()


def train_networks(
    positives: torch.Tensor,
    positive_fpfh: torch.Tensor,
    negatives: torch.Tensor,
    cfg: TrainConfig,
    train_encoder: bool = True,
    train_classifier: bool = True,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> tuple[PointNet2 | None, PointNet2 | None, dict[str, Any]]:
    """Train f_θ (contrastive + disentanglement) and g_φ (BCE) on normalized patches.

    ``positives`` P×k×3 normal patches and their centred patch FPFH (P×33), ``negatives`` N×k×3
    pseudo-abnormal patches. Each step draws ``batch_positives`` normal patches and
    ``round(batch_positives · N / P)`` pseudo-abnormal ones; an epoch is one pass over the
    positives. Returns the trained networks (None where not trained) and the per-epoch losses.
    """
    from tqdm import tqdm

    if len(positives) < 2 or len(negatives) < 1:
        raise ValueError("training needs at least 2 normal and 1 pseudo-abnormal patch")
    history: dict[str, Any] = {"contrastive": [], "disentangle": [], "bce": [], "accuracy": []}
    n_pos, n_neg = len(positives), len(negatives)
    bp = min(cfg.batch_positives, n_pos)
    bn = max(1, round(bp * n_neg / n_pos))
    steps = math.ceil(n_pos / bp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        enc = PointNet2(cfg.feature_dim, width=cfg.width) if train_encoder else None
        clf = PointNet2(2, width=cfg.width) if train_classifier else None
        opt_e = torch.optim.Adam(enc.parameters(), lr=cfg.lr) if enc is not None else None
        opt_c = torch.optim.Adam(clf.parameters(), lr=cfg.lr) if clf is not None else None
        for epoch in tqdm(range(cfg.epochs), desc="3dzal train", disable=not progress, leave=False):
            pp = torch.randperm(n_pos)
            pn = torch.randint(0, n_neg, (steps * bn,))
            sums = {"contrastive": 0.0, "disentangle": 0.0, "bce": 0.0, "accuracy": 0.0}
            for s in range(steps):
                ramp = (epoch * steps + s + 1) / max(1.0, cfg.disentangle_warmup * cfg.epochs * steps)
                ip = pp[s * bp : (s + 1) * bp]
                inn = pn[s * bn : (s + 1) * bn]
                x = torch.cat([positives[ip], negatives[inn]])
                is_pos = torch.cat([torch.ones(len(ip), dtype=torch.bool), torch.zeros(len(inn), dtype=torch.bool)])
                if enc is not None and opt_e is not None:
                    f = enc(x)
                    lc = supcon_loss(F.normalize(f, dim=1), is_pos, cfg.temperature)
                    ld = disentanglement_loss(f[: len(ip)], positive_fpfh[ip])
                    loss = cfg.contrastive_weight * lc + cfg.disentangle_weight * min(1.0, ramp) * ld
                    opt_e.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_e.step()
                    sums["contrastive"] += lc.item()
                    sums["disentangle"] += ld.item()
                if clf is not None and opt_c is not None:
                    logits = clf(x)
                    target = (~is_pos).long()
                    lb = F.cross_entropy(logits, target)
                    opt_c.zero_grad(set_to_none=True)
                    lb.backward()
                    opt_c.step()
                    sums["bce"] += lb.item()
                    sums["accuracy"] += (logits.argmax(1) == target).float().mean().item()
            for key, v in sums.items():
                history[key].append(v / steps)
            if checkpoint_dir is not None:
                _save_checkpoint(Path(checkpoint_dir) / f"epoch{epoch + 1:03d}.safetensors", enc, clf)
    for net in (enc, clf):
        if net is not None:
            net.eval()
    return enc, clf, history


def _save_checkpoint(path: Path, enc: nn.Module | None, clf: nn.Module | None) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for prefix, net in (("encoder.", enc), ("classifier.", clf)):
        if net is not None:
            state.update({prefix + k: v.detach().contiguous() for k, v in net.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """L2-normalized learned features (P×D) of normalized patches, in batches."""
    encoder.eval()
    out = [F.normalize(encoder(x[i : i + batch]), dim=1) for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def perturb(classifier: nn.Module, x: torch.Tensor, epsilon: float = 0.1, direction: str = "lower") -> torch.Tensor:
    """Eq. 8: x̃ = x ± ε·sign(∇_x(−log S_ŷ(x))), ŷ the predicted class (see the module docstring)."""
    if direction not in ("lower", "raise"):
        raise ValueError(f"perturbation direction must be 'lower' or 'raise', got {direction!r}")
    classifier.eval()
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classifier(xg)
        nll = F.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum")
        (grad,) = torch.autograd.grad(nll, xg)
    sign = 1.0 if direction == "lower" else -1.0
    return (x + sign * epsilon * grad.sign()).detach()


def abnormal_probability(
    classifier: nn.Module,
    x: torch.Tensor,
    epsilon: float = 0.1,
    use_perturbation: bool = True,
    direction: str = "lower",
    batch: int = 1024,
) -> torch.Tensor:
    """S_abnormal of every normalized patch, after the Eq. 8 perturbation when asked (Eq. 9–10):
    a P float32 tensor on the device of ``x`` (perturbation, forward and scores all run there)."""
    classifier.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        if use_perturbation and epsilon > 0:
            xb = perturb(classifier, xb, epsilon, direction)
        with torch.no_grad():
            out.append(torch.softmax(classifier(xb), dim=1)[:, 1])
    return torch.cat(out).float() if out else torch.zeros(0, device=x.device)
