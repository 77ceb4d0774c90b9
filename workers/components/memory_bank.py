"""PatchCore's memory bank (Roth et al., CVPR 2022): greedy coreset, exact search, reweighting.

* :func:`greedy_coreset`: exact greedy k-center selection, one matrix-vector product per pick;
* :func:`nearest_distances`: exact nearest-bank distance by chunked ``‖b‖² − 2ab`` matmuls;
* :class:`BankCells`: the same exact search on a CPU with most of the bank skipped: the bank is
  cut into cells (balls around k-center picks) and a query searches only the cells that the
  triangle inequality cannot rule out;
* :class:`MemoryBank`: a bank held centred on its mean on one device (CPU or CUDA), searched by
  :class:`BankCells` on a CPU (large banks) or :func:`nearest_distances`, with PatchCore's
  reweighting of the maximal feature.

Choices and measurements are described in ``workers.patchcore``, the first user.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SEARCH_CHUNK_ELEMENTS = 1 << 19
"""Query rows × bank rows per distance chunk (512k float32 = 2 MB: cache-resident, fastest here)."""
CELLS_MIN_BANK = 1024
"""Banks smaller than this are searched whole (cells would save less than they cost)."""
CELLS_MAX_WORK = 0.25
"""When the cells a batch must search hold more than this fraction of its query × bank pairs
(queries far from every cell, e.g. high-dimensional features), the batch is searched whole."""


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
    out = _min_partial(query, bank_t, bank_sq)
    return out.add_((query * query).sum(dim=1)).clamp_(min=0.0).sqrt_()


def _min_partial(query: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Row minimum of ``‖b‖² − 2ab`` over the bank (``bank_t`` D×K, ``bank_sq`` K), chunked by
    rows so each distance block stays cache-resident; written into ``out`` when given."""
    rows = max(1, SEARCH_CHUNK_ELEMENTS // max(1, bank_t.shape[1]))
    if out is None:
        out = torch.empty(query.shape[0], device=query.device)
    for start in range(0, query.shape[0], rows):
        partial = torch.addmm(bank_sq.unsqueeze(0), query[start : start + rows], bank_t, beta=1.0, alpha=-2.0)
        torch.amin(partial, dim=1, out=out[start : start + rows])
    return out


class BankCells:
    """An exact nearest-bank search that skips most of the bank: a partition of it into cells.

    The cells are balls: ``n_cells`` greedy k-center picks of the bank are the seeds, every bank
    element joins its nearest seed, and a cell keeps its members' mean ``c`` and radius ``r`` (the
    largest member distance to ``c``). No member of a cell is nearer a query ``q`` than
    ``‖q − c‖ − r`` (triangle inequality). A search first takes each query's nearest element in
    the cell of its nearest centre, an upper bound ``U`` on its nearest distance, then searches
    only the cells with ``‖q − c‖ − r ≤ U + δ``, where ``δ`` covers float32's rounding of the
    three terms (so the true nearest element is always searched). What it returns is what
    :func:`nearest_distances` returns, to float rounding: the same minimum, summed in other blocks.
    On an FPFH bank of 5 886 elements and the 11 343 voxels of a good part, the cells searched
    hold 5–8 % of the bank (measured in docs/design/patchcore-fpfh.md).
    """

    def __init__(self, centred: torch.Tensor, n_cells: int | None = None) -> None:
        k, d = centred.shape
        n_cells = int(n_cells if n_cells is not None else max(1, round(math.sqrt(k))))
        seeds = greedy_coreset(centred, n_cells, projection_dim=0, seed=0)
        bank = centred.double()
        seed_sq = (bank[seeds] ** 2).sum(dim=1)
        cell_of = torch.argmin(seed_sq.unsqueeze(0) - 2.0 * bank @ bank[seeds].T, dim=1)
        order = torch.argsort(cell_of, stable=True)
        counts = torch.bincount(cell_of, minlength=len(seeds))
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Per cell: its members transposed (D×Kc, contiguous) and their squared norms."""
        centres, radii = [], []
        for c in range(len(seeds)):
            if counts[c] == 0:
                continue
            members = bank[order[bounds[c] : bounds[c + 1]]]
            centre = members.mean(dim=0)
            centres.append(centre)
            radii.append(float((members - centre).norm(dim=1).max()))
            m32 = members.float()
            self.blocks.append((m32.T.contiguous(), (m32 * m32).sum(dim=1)))
        cen = torch.stack(centres).float()
        self.centres_t = cen.T.contiguous()
        self.centres_sq = (cen * cen).sum(dim=1)
        self.radii = torch.tensor(radii, dtype=torch.float32)
        self.size = torch.tensor([b[0].shape[1] for b in self.blocks], dtype=torch.float32)
        self.k, self.d = k, d
        max_norm = float(max(bank.norm(dim=1).max(), cen.double().norm(dim=1).max()))
        self.max_sq = max_norm * max_norm
        """The largest squared norm of a bank element or centre, for the rounding bound δ."""

    def __len__(self) -> int:
        return len(self.blocks)

    def _rounding(self, query_sq: torch.Tensor) -> torch.Tensor:
        """δ per query: a bound on float32's error in a distance by ``‖a‖² + ‖b‖² − 2ab`` (the
        dot product's error is below ``D · 2⁻²³ · ‖a‖‖b‖``; the square root can at most take its
        root), doubled for the two distances a bound compares, plus an error on ``r``."""
        eps = self.d * 2.0**-23
        return 2.0 * torch.sqrt(4.0 * eps * (query_sq + self.max_sq)) + 1e-5 * math.sqrt(self.max_sq)

    def nearest_distances(self, query: torch.Tensor) -> torch.Tensor | None:
        """Distance (N,) of every centred float32 query row to its nearest bank element (exact, see
        the class), or ``None`` when the cells to search hold more than ``CELLS_MAX_WORK`` of the
        bank per query: then a whole search is cheaper."""
        n = query.shape[0]
        query_sq = (query * query).sum(dim=1)
        to_centre = torch.addmm(self.centres_sq.unsqueeze(1), self.centres_t.T, query.T, beta=1.0, alpha=-2.0)
        to_centre = to_centre.add_(query_sq).clamp_(min=0.0).sqrt_()  # C×N
        best = torch.full((n,), math.inf)
        first = torch.argmin(to_centre, dim=0)
        order = torch.argsort(first, stable=True)
        self._search_cells(query, best, order, first[order])
        upper = best.add(query_sq).clamp_(min=0.0).sqrt_()
        need = to_centre.sub_(self.radii.unsqueeze(1)) <= upper.add_(self._rounding(query_sq))
        need[first, torch.arange(n)] = False
        if float(need.sum(dim=1).float() @ self.size) > CELLS_MAX_WORK * n * self.k:
            return None
        cell, rows = need.nonzero(as_tuple=True)  # sorted by cell
        self._search_cells(query, best, rows, cell)
        return best.add_(query_sq).clamp_(min=0.0).sqrt_()

    def _search_cells(self, query: torch.Tensor, best: torch.Tensor, rows: torch.Tensor, cell: torch.Tensor) -> None:
        """``best[r] = min(best[r], min over b in cell c of ‖b‖² − 2 q_r·b)`` for every pair
        ``(r, c)`` of ``rows`` × ``cell`` (sorted by cell): one gather, one matmul per cell, one
        scatter."""
        counts = torch.bincount(cell, minlength=len(self.blocks)).tolist()
        gathered = query.index_select(0, rows)
        vals = torch.empty(len(rows))
        start = 0
        for (bank_t, bank_sq), count in zip(self.blocks, counts, strict=True):
            if count:
                end = start + count
                _min_partial(gathered[start:end], bank_t, bank_sq, out=vals[start:end])
                start = end
        best.scatter_reduce_(0, rows, vals, reduce="amin")


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
        self._cells: BankCells | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def to(self, device: torch.device | str) -> MemoryBank:
        """This bank on ``device`` (itself when already there)."""
        return self if torch.device(device) == self.device else MemoryBank(self.array, device)

    def centre(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``features`` (N×D) moved to the bank's device and centred on the bank mean."""
        return torch.as_tensor(features).to(self.device) - self.mean

    @property
    def cells(self) -> BankCells | None:
        """The bank's cells (built on first use), for an exact search of a large bank on a CPU;
        ``None`` on another device or for a small bank (searched whole)."""
        if self.device.type != "cpu" or len(self) < CELLS_MIN_BANK:
            return None
        if self._cells is None:
            self._cells = BankCells(self.centred)
        return self._cells

    def nearest_distances(self, centred_query: torch.Tensor) -> torch.Tensor:
        """Distance (N,) of every centred query row to its nearest bank element (exact)."""
        cells = self.cells
        if cells is not None and centred_query.dtype == torch.float32 and len(centred_query):
            out = cells.nearest_distances(centred_query)
            if out is not None:
                return out
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
