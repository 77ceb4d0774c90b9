"""PatchCore's memory bank (Roth et al., CVPR 2022): greedy coreset, exact search, reweighting.

* :func:`greedy_coreset`: exact greedy k-center selection, one matrix-vector product per pick;
* :func:`nearest_distances`: exact nearest-bank distance by chunked ``‖b‖² − 2ab`` matmuls;
* :class:`MemoryBank`: a bank held centred on its mean on one device (CPU or CUDA), searched by
  :func:`nearest_distances`, with PatchCore's reweighting of the maximal feature.

Choices and measurements are described in ``workers.patchcore``, the first user.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SEARCH_CHUNK_ELEMENTS = 1 << 19
"""Query rows × bank rows per distance chunk (512k float32 = 2 MB: cache-resident, fastest here)."""


def coreset_size(n: int, ratio: float, maximum: int) -> int:
    """How many of ``n`` bank elements a coreset of ``ratio`` (``>= 1``: all) keeps, at most ``maximum``."""
    if ratio >= 1.0:
        return min(n, maximum)
    return min(n, maximum, max(1, int(ratio * n)))


def greedy_coreset(
    features: np.ndarray | torch.Tensor,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Indices of a greedy k-center coreset of ``features`` (N×D), PatchCore style.

    Starts from a seeded random element and repeatedly adds the element farthest from the
    selected set, keeping every element's squared distance to that set up to date with one
    matrix-vector product per pick. When ``D > projection_dim > 0`` the features are first
    projected by a seeded Gaussian matrix. Returns at most ``n_select`` distinct indices (fewer
    when all elements are already covered exactly), in selection order.
    """
    from tqdm import tqdm

    x = torch.as_tensor(features, dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty N×D array, got shape {tuple(x.shape)}")
    n, d = x.shape
    n_select = int(min(max(n_select, 1), n))
    gen = torch.Generator().manual_seed(int(seed))
    if 0 < projection_dim < d:
        proj = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj
    x = x - x.mean(dim=0)
    sq = (x * x).sum(dim=1)
    xt = x.T.contiguous()  # D×N: the per-pick row-vector × matrix product streams it fastest
    start = int(torch.randint(n, (1,), generator=gen))
    selected = [start]
    min_d = torch.empty(n)
    buf = torch.empty(n)
    min_np = min_d.numpy()  # shares memory; numpy's argmax is much faster than torch's on CPU

    def sq_dist_to(i: int, out: torch.Tensor) -> torch.Tensor:
        torch.matmul(x[i].unsqueeze(0), xt, out=out.unsqueeze(0))
        return out.mul_(-2.0).add_(sq).add_(sq[i])

    sq_dist_to(start, min_d)
    min_d[start] = 0.0
    for _ in tqdm(range(n_select - 1), desc="coreset", disable=not progress, leave=False):
        idx = int(min_np.argmax())
        if min_np[idx] <= 0.0:
            break
        selected.append(idx)
        torch.minimum(min_d, sq_dist_to(idx, buf), out=min_d)
        min_d[idx] = 0.0
    return np.asarray(selected, dtype=np.int64)


def nearest_distances(query: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance from every row of ``query`` (N×D) to its nearest bank element.

    ``bank_t`` is the bank transposed (D×K, contiguous), ``bank_sq`` its rows' squared norms.
    Chunked ``‖b‖² − 2ab`` matmuls sized to stay cache-resident; ``‖a‖²`` is added after the
    row minimum, and the result clamped at 0 before the square root.
    """
    rows = max(1, SEARCH_CHUNK_ELEMENTS // max(1, bank_t.shape[1]))
    out = torch.empty(query.shape[0], device=query.device)
    for start in range(0, query.shape[0], rows):
        q = query[start : start + rows]
        partial = torch.addmm(bank_sq.unsqueeze(0), q, bank_t, beta=1.0, alpha=-2.0)
        torch.amin(partial, dim=1, out=out[start : start + rows])
    return out.add_((query * query).sum(dim=1)).clamp_(min=0.0).sqrt_()


class MemoryBank:
    """A K×D float32 feature bank on one device, searched exactly (distances on mean-centred features).

    ``array`` is the bank as given (what an artifact stores); the search works on features
    centred on the bank mean (distances are unchanged, float32 cancellation is smaller).
    """

    def __init__(self, bank: np.ndarray, device: torch.device | str = "cpu") -> None:
        arr = np.ascontiguousarray(bank, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty K×D array, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("memory bank holds non-finite values")
        self.array = arr
        self.device = torch.device(device)
        t = torch.from_numpy(arr.copy()).to(self.device)
        self.mean = t.mean(dim=0)
        self.centred = (t - self.mean).contiguous()
        self.centred_t = self.centred.T.contiguous()
        """D×K contiguous copy of ``centred`` for the search matmul."""
        self.sq = (self.centred * self.centred).sum(dim=1)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def to(self, device: torch.device | str) -> MemoryBank:
        """This bank on ``device`` (itself when already there)."""
        return self if torch.device(device) == self.device else MemoryBank(self.array, device)

    def centre(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``features`` (N×D) moved to the bank's device and centred on the bank mean."""
        return torch.as_tensor(features).to(self.device) - self.mean

    def nearest_distances(self, centred_query: torch.Tensor) -> torch.Tensor:
        """Distance (N,) of every centred query row to its nearest bank element."""
        return nearest_distances(centred_query, self.centred_t, self.sq)

    def sq_dist_to_bank(self, v: torch.Tensor) -> torch.Tensor:
        """Squared distances (K,) from one centred feature to every bank element."""
        return torch.addmv(self.sq, self.centred, v, beta=1.0, alpha=-2.0).add_(v.dot(v))

    def reweight(self, m_test: torch.Tensor, neighbors: int) -> float:
        """PatchCore's weight w for the maximal point's centred feature (1 when ``neighbors <= 1``).

        m* is ``m_test``'s nearest bank element and N_b(m*) the b nearest bank elements of m*
        (m* itself included, as in anomalib); ``w = 1 − softmax(‖m_test − m‖ for m in N_b(m*))[m*]``.
        """
        b = min(int(neighbors), len(self))
        if b <= 1:
            return 1.0
        m_star = int(torch.argmin(self.sq_dist_to_bank(m_test)))
        d2_anchor = self.sq_dist_to_bank(self.centred[m_star])
        d2_anchor[m_star] = -1.0  # m* is its own nearest neighbour: first in N_b(m*)
        support = torch.topk(d2_anchor, b, largest=False, sorted=True).indices
        d = (self.centred[support] - m_test).norm(dim=1)
        return float(1.0 - torch.softmax(d, dim=0)[0])
