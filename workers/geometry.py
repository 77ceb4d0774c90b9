"""Point-cloud geometry in torch, on whatever device the points are on (CPU or CUDA).

What: the heavy geometric steps that sit outside the networks, written once in device-agnostic,
vectorized torch so a frame can stay on the GPU from upload to anomaly map :

* :func:`knn`: exact k nearest neighbours, what ``scipy.spatial.cKDTree.query`` returns
  (chunked ``torch.cdist`` + ``topk``; through the grid below for large clouds);
* :func:`hybrid_search`: the ``max_nn`` nearest neighbours within ``radius``, what open3d's
  ``KDTreeSearchParamHybrid(radius, max_nn)`` returns (sorted by distance, the query itself
  first, squared distances), found through a uniform grid of ``radius``-sized cells: every
  query looks only at the points of its 27 surrounding cells, so the work grows with the
  neighbourhood size, not with N²;
* :func:`estimate_normals`: PCA normals (eigenvector of the smallest eigenvalue of the
  neighbourhood covariance, batched 3×3 ``torch.linalg.eigh``), as open3d's
  ``PointCloud.estimate_normals``, oriented away from the centroid as ``workers.patchcore`` does;
* :func:`fpfh`: Fast Point Feature Histograms (Rusu, Blodow & Beetz, ICRA 2009) exactly as
  open3d's ``pipelines.registration.compute_fpfh_feature`` computes them
  (``cpp/open3d/pipelines/registration/Feature.cpp``): SPFH = three 11-bin histograms of the
  Darboux-frame angles (α, φ, θ) between a point and each of its neighbours, each pair adding
  ``100 / (n_neighbours)``; FPFH = the neighbours' SPFH weighted by ``1 / squared distance``,
  each 11-bin block rescaled to sum to 100, plus the point's own SPFH;
* :func:`farthest_point_sample`, :func:`voxel_downsample` (centroids + inverse index, the
  result of the numpy version ``workers.preprocess`` used before) and :func:`ransac_plane`
  (all hypotheses scored in one batched product, then a least-squares refit on the inliers of
  the best one, as open3d's ``segment_plane`` does).

Why torch everywhere rather than a KD-tree: there is no KD-tree on the GPU in torch, and
brute-force or grid searches are what GPUs do well. On a CPU the C++ KD-trees of open3d /
scipy stay faster, so the callers keep them as their CPU default (figures in
``workers.patchcore``) and use this module when the scorer runs on a CUDA device.

Everything is vectorized over points; the only Python loops run over fixed-size chunks of
queries (to bound memory) and over the picks of farthest point sampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FPFH_BINS = 11
"""Bins per angle histogram (open3d); an FPFH has ``3 × FPFH_BINS = 33`` dimensions."""
_CHUNK_ELEMENTS = 1 << 22
"""Query × candidate pairs per chunk (4M: ~50 MB of float32 intermediates per chunk)."""

_OFFSETS = torch.tensor([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def _check_cloud(points: torch.Tensor, name: str = "points") -> None:
    if not isinstance(points, torch.Tensor) or points.ndim != 2 or points.shape[1] != 3:
        shape = tuple(points.shape) if hasattr(points, "shape") else type(points).__name__
        raise ValueError(f"{name} must be an N×3 torch tensor, got {shape}")


# ------------------------------------------------------------------------------------------------
# neighbour search


def knn(
    ref: torch.Tensor, query: torch.Tensor, k: int, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest points of ``ref`` (N×3) to every row of ``query`` (Q×3).

    Returns ``(distances, indices)``, both Q×k, ascending, as ``cKDTree(ref).query(query, k)``
    (``k`` is capped at N). Small problems (N·Q ≤ ``chunk_elements``) go by brute force
    (:func:`knn_brute`). Larger ones go through the grid of :func:`hybrid_search`, which is
    still exact: the radius is the largest k-th-neighbour distance of 256 sampled queries
    (brute force), and a query that finds ``k`` points within it has found its ``k`` nearest
    (every other point is farther than the radius); the few that find fewer go by brute force.
    """
    _check_cloud(ref, "ref")
    _check_cloud(query, "query")
    k = int(min(max(k, 1), ref.shape[0]))
    nq = query.shape[0]
    if ref.shape[0] * nq <= chunk_elements or nq <= 256:
        return knn_brute(ref, query, k, chunk_elements)
    probe = torch.linspace(0, nq - 1, 256, device=query.device).long()
    radius = float(knn_brute(ref, query[probe], k, chunk_elements)[0][:, -1].max()) * 1.01
    if not radius > 0:
        return knn_brute(ref, query, k, chunk_elements)
    d2, idx = hybrid_search(ref, query, radius, k, chunk_elements)
    dist = torch.empty(nq, k, dtype=ref.dtype, device=ref.device)
    out = torch.empty(nq, k, dtype=torch.long, device=ref.device)
    full = torch.zeros(nq, dtype=torch.bool, device=ref.device)
    if idx.shape[1] == k:
        full = idx[:, -1] >= 0
        dist[full], out[full] = d2[full].sqrt(), idx[full]
    rest = torch.nonzero(~full).squeeze(1)
    if rest.numel():
        dist[rest], out[rest] = knn_brute(ref, query[rest], k, chunk_elements)
    return dist, out


def knn_brute(
    ref: torch.Tensor, query: torch.Tensor, k: int, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` by brute force: chunks of queries against all of ``ref`` by ``torch.cdist``
    without the matmul shortcut (no ``‖a‖² + ‖b‖² − 2ab`` cancellation, so near-ties order as a
    KD-tree orders them), then ``topk``."""
    k = int(min(max(k, 1), ref.shape[0]))
    rows = max(1, chunk_elements // max(1, ref.shape[0]))
    dist = torch.empty(query.shape[0], k, dtype=ref.dtype, device=ref.device)
    idx = torch.empty(query.shape[0], k, dtype=torch.long, device=ref.device)
    for s in range(0, query.shape[0], rows):
        d = torch.cdist(query[s : s + rows], ref, compute_mode="donot_use_mm_for_euclid_dist")
        torch.topk(d, k, dim=1, largest=False, sorted=True, out=(dist[s : s + rows], idx[s : s + rows]))
    return dist, idx


def hybrid_search(
    ref: torch.Tensor,
    query: torch.Tensor,
    radius: float,
    max_nn: int,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_nn`` nearest points of ``ref`` within ``radius`` of every query (open3d's hybrid search).

    Returns ``(dist2, indices)``, Q×K with ``K = min(max_nn, most neighbours any query has)``,
    ascending squared distances; slots beyond a query's neighbour count hold ``inf`` / ``-1``.
    Like open3d's KD-tree (nanoflann's radius search), a point counts when ``d² < radius²``.

    Grid: ``ref`` is bucketed into cubic cells of side ``radius`` and sorted by cell; each
    query's candidates are the points of the 3×3×3 cells around its own (they cover its whole
    ball), laid out as one padded row per query, then masked to the ball and ``topk``-ed.
    """
    _check_cloud(ref, "ref")
    _check_cloud(query, "query")
    if radius <= 0 or max_nn < 1:
        raise ValueError("radius must be > 0 and max_nn >= 1")
    dev = ref.device
    nq = query.shape[0]
    if ref.shape[0] == 0 or nq == 0:
        return (torch.full((nq, 0), math.inf, dtype=ref.dtype, device=dev),
                torch.full((nq, 0), -1, dtype=torch.long, device=dev))
    lo = torch.minimum(ref.amin(dim=0), query.amin(dim=0))
    side = float(radius) * (1.0 + 1e-6)  # a hair wider than the ball, against rounding at cell faces
    cell_r = torch.floor((ref - lo) / side).long() + 1  # +1: every neighbour cell index stays >= 0
    cell_q = torch.floor((query - lo) / side).long() + 1
    dims = torch.maximum(cell_r.amax(dim=0), cell_q.amax(dim=0)) + 2

    def key(c: torch.Tensor) -> torch.Tensor:
        return (c[..., 0] * dims[1] + c[..., 1]) * dims[2] + c[..., 2]

    ref_key = key(cell_r)
    sorted_key, order = torch.sort(ref_key)
    nkeys = key(cell_q.unsqueeze(1) + _OFFSETS.to(dev))  # Q×27
    starts = torch.searchsorted(sorted_key, nkeys)
    counts = torch.searchsorted(sorted_key, nkeys, right=True) - starts
    ends_cum = counts.cumsum(dim=1)  # Q×27: end of each cell's run within the query's row
    per_query = ends_cum[:, -1]
    r2 = float(radius) ** 2

    width = max(1, min(int(max_nn), int(per_query.max())))
    out_d2 = torch.full((nq, width), math.inf, dtype=ref.dtype, device=dev)
    out_idx = torch.full((nq, width), -1, dtype=torch.long, device=dev)
    rows = max(1, chunk_elements // max(1, int(per_query.max())))
    for s in range(0, nq, rows):
        e = min(nq, s + rows)
        c = max(1, int(per_query[s:e].max()))
        j = torch.arange(c, device=dev).expand(e - s, c).contiguous()
        seg = torch.searchsorted(ends_cum[s:e], j, right=True).clamp_(max=26)  # which of the 27 cells
        pos = starts[s:e].gather(1, seg) + j - (ends_cum[s:e].gather(1, seg) - counts[s:e].gather(1, seg))
        present = j < per_query[s:e, None]
        cand = order[pos.clamp_(max=ref.shape[0] - 1)]
        d2 = (ref[cand] - query[s:e, None, :]).square().sum(dim=2)
        d2 = d2.masked_fill_(~present | ~(d2 < r2), math.inf)
        kk = min(width, c)
        top_d2, top_j = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
        top_idx = cand.gather(1, top_j).masked_fill_(torch.isinf(top_d2), -1)
        out_d2[s:e, :kk] = top_d2
        out_idx[s:e, :kk] = top_idx
    filled = int((out_idx >= 0).sum(dim=1).max())
    return out_d2[:, : max(filled, 0)], out_idx[:, : max(filled, 0)]


# ------------------------------------------------------------------------------------------------
# normals and FPFH


def estimate_normals(
    points: torch.Tensor, radius: float, max_nn: int = 30, orient: str = "centroid"
) -> torch.Tensor:
    """Unit normals (N×3) by PCA of each point's hybrid neighbourhood (open3d's ``estimate_normals``).

    The neighbourhood is the ``max_nn`` nearest points within ``radius`` (the point itself
    included); the normal is the eigenvector of the smallest eigenvalue of their covariance. A
    point with fewer than 3 neighbours, or a degenerate (all-coincident) neighbourhood, gets
    ``(0, 0, 1)`` as in open3d. ``orient="centroid"`` flips every normal to point away from the
    cloud's centroid (the rule of ``workers.patchcore.fpfh_features``); ``"none"`` leaves PCA's sign.
    """
    _check_cloud(points)
    if orient not in ("centroid", "none"):
        raise ValueError(f"orient must be 'centroid' or 'none', got {orient!r}")
    _, idx = hybrid_search(points, points, radius, max_nn)
    valid = idx >= 0
    cnt = valid.sum(dim=1)
    w = valid.to(points.dtype)
    nb = points[idx.clamp(min=0)] * w.unsqueeze(2)
    mean = nb.sum(dim=1) / cnt.clamp(min=1).unsqueeze(1).to(points.dtype)
    centred = (nb - mean.unsqueeze(1)) * w.unsqueeze(2)
    cov = torch.einsum("nki,nkj->nij", centred, centred) / cnt.clamp(min=1).view(-1, 1, 1).to(points.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    normals = evecs[:, :, 0].contiguous()
    degenerate = (cnt < 3) | (evals[:, 2] <= 0)
    normals[degenerate] = torch.tensor([0.0, 0.0, 1.0], dtype=points.dtype, device=points.device)
    if orient == "centroid":
        flip = ((points - points.mean(dim=0)) * normals).sum(dim=1) < 0
        normals[flip] = -normals[flip]
    return normals


def pair_features(
    p1: torch.Tensor, n1: torch.Tensor, p2: torch.Tensor, n2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Darboux-frame angles (α = atan2(w·n2, u·n2), φ = v·n2, θ = u·d) of point pairs.

    Elementwise over any leading shape (…×3 inputs), as open3d's ``ComputePairFeatures``: the
    source is the point whose normal makes the smaller angle with the connecting line; a pair
    of coincident points, or one whose line is parallel to the source normal, gives (0, 0, 0).
    """
    dp = p2 - p1
    dn = dp.norm(dim=-1)
    safe = torch.where(dn > 0, dn, torch.ones_like(dn))
    a1 = (n1 * dp).sum(dim=-1) / safe
    a2 = (n2 * dp).sum(dim=-1) / safe
    swap = torch.acos(a1.abs()) > torch.acos(a2.abs())
    sw = swap.unsqueeze(-1)
    u = torch.where(sw, n2, n1)
    nt = torch.where(sw, n1, n2)
    dp = torch.where(sw, -dp, dp)
    theta = torch.where(swap, -a2, a1)
    v = torch.linalg.cross(dp, u, dim=-1)
    vn = v.norm(dim=-1)
    v = v / torch.where(vn > 0, vn, torch.ones_like(vn)).unsqueeze(-1)
    w = torch.linalg.cross(u, v, dim=-1)
    phi = (v * nt).sum(dim=-1)
    alpha = torch.atan2((w * nt).sum(dim=-1), (u * nt).sum(dim=-1))
    ok = (dn > 0) & (vn > 0)
    zero = torch.zeros_like(alpha)
    return torch.where(ok, alpha, zero), torch.where(ok, phi, zero), torch.where(ok, theta, zero)


def _bin(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x).clamp_(0, FPFH_BINS - 1).long()


def fpfh(
    points: torch.Tensor,
    normals: torch.Tensor,
    radius: float,
    max_nn: int = 100,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """FPFH (N×33, the dtype of ``points``) of every point, as open3d's ``compute_fpfh_feature``.

    Neighbourhoods are :func:`hybrid_search` ``(radius, max_nn)``, the first (nearest, the point
    itself) skipped. SPFH(i): for each neighbour j, the pair's (α, φ, θ) fall into
    ``floor(11 (α + π) / 2π)``, ``floor(11 (φ + 1) / 2)``, ``floor(11 (θ + 1) / 2)`` (clamped to
    0…10) of three 11-bin histograms, each pair adding ``100 / (count − 1)``. FPFH(i) =
    ``Σ_j SPFH(j) / d²_ij`` over neighbours at non-zero distance, each 11-bin block scaled to sum
    to 100, + SPFH(i). A point with no neighbour but itself gets all zeros.
    """
    _check_cloud(points)
    _check_cloud(normals, "normals")
    d2, idx = hybrid_search(points, points, radius, max_nn)
    n = points.shape[0]
    dt, dev = points.dtype, points.device
    if idx.shape[1] < 2:
        return torch.zeros(n, 3 * FPFH_BINS, dtype=dt, device=dev)
    d2, idx = d2[:, 1:], idx[:, 1:]  # skip the point itself
    valid = idx >= 0
    cnt = valid.sum(dim=1)  # neighbours other than the point itself
    incr = torch.where(cnt > 0, 100.0 / cnt.clamp(min=1).to(dt), torch.zeros((), dtype=dt, device=dev))
    k = idx.shape[1]
    rows = max(1, chunk_elements // (k * 3))
    offsets = torch.tensor([0, FPFH_BINS, 2 * FPFH_BINS], device=dev)

    spfh = torch.zeros(n, 3 * FPFH_BINS, dtype=dt, device=dev)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        j = idx[s:e].clamp(min=0)
        alpha, phi, theta = pair_features(points[s:e, None, :], normals[s:e, None, :], points[j], normals[j])
        bins = torch.stack([
            _bin(FPFH_BINS * (alpha + math.pi) / (2.0 * math.pi)),
            _bin(FPFH_BINS * (phi + 1.0) * 0.5),
            _bin(FPFH_BINS * (theta + 1.0) * 0.5),
        ], dim=2) + offsets  # rows×k×3
        add = (valid[s:e].to(dt) * incr[s:e, None]).unsqueeze(2).expand(-1, -1, 3)
        spfh[s:e].scatter_add_(1, bins.reshape(e - s, -1), add.reshape(e - s, -1))

    weight = torch.where(valid & (d2 > 0), 1.0 / torch.where(d2 > 0, d2, torch.ones_like(d2)),
                         torch.zeros_like(d2))
    out = torch.zeros_like(spfh)
    rows = max(1, chunk_elements // (k * 3 * FPFH_BINS))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        agg = torch.einsum("qk,qkd->qd", weight[s:e], spfh[idx[s:e].clamp(min=0)])
        block = agg.view(e - s, 3, FPFH_BINS).sum(dim=2, keepdim=True)
        scale = torch.where(block != 0, 100.0 / torch.where(block != 0, block, torch.ones_like(block)),
                            torch.zeros_like(block))
        out[s:e] = (agg.view(e - s, 3, FPFH_BINS) * scale).view(e - s, -1) + spfh[s:e]
    out[cnt == 0] = 0.0
    return out


# ------------------------------------------------------------------------------------------------
# sampling, voxels, planes


def farthest_point_sample(
    points: torch.Tensor,
    n: int,
    start: int | torch.Tensor = 0,
    valid: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Farthest point sampling: indices (n, or B×n) of ``n`` points of ``points`` (N×3 or B×N×3).

    Starts at ``start`` (an index, or one per cloud) and repeatedly takes the point farthest
    (squared Euclidean, float32) from those already taken; the first of equally far points wins.
    ``valid`` (N or B×N, bool) restricts the picks to a subset; when it has fewer than ``n``
    points, picks repeat. ``impl``: ``"torch"`` runs on the points' device, batched, ~15 kernels a pick;
    ``"numpy"``, a planar numpy loop per cloud on the host (3× faster on a CPU); ``"auto"``: torch for a
    batch on an accelerator, else numpy (one cloud's 4096 picks cost imrnet ~0.8 s of launches on an H200,
    docs/design/imrnet.md). Both give the same picks (same float32 arithmetic, same tie rule).
    """
    single = points.ndim == 2
    pts = (points.unsqueeze(0) if single else points).float()
    if pts.ndim != 3 or pts.shape[-1] != 3:
        raise ValueError(f"points must be N×3 or B×N×3, got {tuple(points.shape)}")
    if n < 1:
        raise ValueError("n must be >= 1")
    b, npts, _ = pts.shape
    dev = pts.device
    if valid is None:
        vb = torch.ones(b, npts, dtype=torch.bool, device=dev)
    else:
        vb = (valid.unsqueeze(0) if single else valid).to(dev)
    st = torch.as_tensor(start, dtype=torch.long, device=dev).reshape(-1).expand(b)
    if impl not in ("auto", "torch", "numpy"):
        raise ValueError(f"impl must be auto, torch or numpy, got {impl!r}")
    if impl == "numpy" or (impl == "auto" and (dev.type == "cpu" or b == 1)):
        p_np, v_np, s_np = pts.cpu().numpy(), vb.cpu().numpy(), st.cpu().numpy()
        out = torch.from_numpy(np.stack([_fps_numpy(p_np[i], n, int(s_np[i]), v_np[i]) for i in range(b)]))
        out = out.to(dev)
    else:
        out = _fps_torch(pts, n, st, vb)
    return out[0] if single else out


def _fps_torch(pts: torch.Tensor, n: int, start: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    b = pts.shape[0]
    x, y, z = (pts[:, :, j].contiguous() for j in range(3))
    dist = torch.full(valid.shape, math.inf, device=pts.device).masked_fill_(~valid, -1.0)
    out = torch.empty(b, n, dtype=torch.long, device=pts.device)
    rows = torch.arange(b, device=pts.device)
    cur = start.clone()
    for i in range(n):
        out[:, i] = cur
        dx = x - x[rows, cur].unsqueeze(1)
        d = dx * dx
        dy = y - y[rows, cur].unsqueeze(1)
        d = d + dy * dy
        dz = z - z[rows, cur].unsqueeze(1)
        d = d + dz * dz
        dist = torch.where(valid, torch.minimum(dist, d), dist)
        cur = dist.argmax(dim=1)
    return out


def _fps_numpy(pts: np.ndarray, n: int, start: int, valid: np.ndarray) -> np.ndarray:
    """FPS of one cloud (N×3) in numpy (planar float32 coordinates)."""
    x, y, z = (np.ascontiguousarray(pts[:, j], dtype=np.float32) for j in range(3))
    dist = np.full(len(x), np.inf, dtype=np.float32)
    dist[~valid] = -1.0
    out = np.empty(n, dtype=np.int64)
    d = np.empty_like(dist)
    t = np.empty_like(dist)
    cur = start
    for i in range(n):
        out[i] = cur
        np.subtract(x, x[cur], out=d)
        np.multiply(d, d, out=d)
        np.subtract(y, y[cur], out=t)
        d += t * t
        np.subtract(z, z[cur], out=t)
        d += t * t
        np.minimum(dist, d, out=dist, where=valid)
        cur = int(dist.argmax())
    return out


def cell_ranks(key: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Each key's rank among the distinct keys, i.e. ``torch.unique(key, sorted=True,
    return_inverse=True)[1]``. Keys below ``n_keys``, when that is at most a few times the key
    count, are ranked by one count per key instead of a sort (a 1920×1200 frame's 0.5 M
    foreground points: 5 instead of 14 ms); wider ranges are sorted."""
    if n_keys <= 4 * key.numel() + (1 << 20):
        present = torch.bincount(key, minlength=n_keys) > 0
        return (torch.cumsum(present, 0) - 1)[key]
    return torch.unique(key, sorted=True, return_inverse=True)[1]


def voxel_downsample(points: torch.Tensor, voxel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel centroids (M×3 float32) and, for each input point, the index of its voxel (N, long).

    Cells are ``floor((p − min p) / voxel)`` in the points' dtype; voxels are numbered in
    increasing linear cell key (x-major), centroids summed in float64, so the result is the one
    of the numpy version in ``workers.preprocess``. ``voxel <= 0`` keeps every point.
    """
    _check_cloud(points)
    if voxel <= 0:
        return points.float(), torch.arange(points.shape[0], device=points.device)
    cells = torch.floor((points - points.amin(dim=0)) / voxel).long()
    dims = cells.amax(dim=0) + 1
    key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    inverse = cell_ranks(key, int(dims.prod()))
    m = int(inverse.max()) + 1
    sums = torch.zeros(m, 3, dtype=torch.float64, device=points.device).index_add_(0, inverse, points.double())
    counts = torch.bincount(inverse, minlength=m).double()
    return (sums / counts.unsqueeze(1)).float(), inverse


def grid_downsample(
    points: torch.Tensor, flat: torch.Tensor, width: int, block: int, voxel: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-grid downsampling: centroids (M×3 float32) of the points in each ``block``×``block``
    pixel block and ``voxel``-thick depth layer (z), and each point's cell (N, long).

    ``flat`` are the points' flat pixel indices in an image ``width`` pixels wide. The depth
    layers keep a block that straddles a depth step (a part's edge over the table) from
    averaging into mid-air, as a voxel grid would. Cells are numbered in increasing key order,
    centroids summed in float64, as :func:`voxel_downsample`.
    """
    _check_cloud(points)
    rows = torch.div(flat, width, rounding_mode="floor") // block
    cols = torch.remainder(flat, width) // block
    z = points[:, 2].double()
    layer = torch.floor((z - z.min()) / voxel).long()
    n_cols = int(cols.max()) + 1
    n_layers = int(layer.max()) + 1
    key = (rows * n_cols + cols) * n_layers + layer
    inverse = cell_ranks(key, (int(rows.max()) + 1) * n_cols * n_layers)
    m = int(inverse.max()) + 1
    sums = torch.zeros(m, 3, dtype=torch.float64, device=points.device).index_add_(0, inverse, points.double())
    counts = torch.bincount(inverse, minlength=m).double()
    return (sums / counts.unsqueeze(1)).float(), inverse


def fit_plane(points: torch.Tensor) -> torch.Tensor:
    """Least-squares plane ``(a, b, c, d)`` (unit normal, ``a x + b y + c z + d = 0``) through ``points``."""
    centroid = points.mean(dim=0)
    c = points - centroid
    _, evecs = torch.linalg.eigh(c.T @ c)
    normal = evecs[:, 0]
    return torch.cat([normal, (-(normal * centroid).sum()).reshape(1)])


def ransac_plane(
    points: torch.Tensor,
    distance: float,
    iterations: int = 200,
    seed: int = 0,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RANSAC plane: ``(plane (4,), inlier mask (N,))`` of the plane through most points.

    ``iterations`` hypotheses, each the plane through 3 random points (seeded CPU generator, so
    every device draws the same ones), are scored at once: inliers are points with
    ``|distance| < distance`` in one hypotheses × points product (chunked). As open3d's
    ``segment_plane``: the inliers are those of the best hypothesis and the returned plane is the
    least-squares fit to them (:func:`fit_plane`).
    """
    _check_cloud(points)
    n = points.shape[0]
    if n < 3:
        raise ValueError("a plane needs at least 3 points")
    gen = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(n, (max(1, int(iterations)), 3), generator=gen).to(points.device)
    p = points.double()
    a, b, c = p[picks[:, 0]], p[picks[:, 1]], p[picks[:, 2]]
    normal = torch.linalg.cross(b - a, c - a, dim=1)
    norm = normal.norm(dim=1, keepdim=True)
    ok = norm.squeeze(1) > 0
    normal = normal / torch.where(norm > 0, norm, torch.ones_like(norm))
    offset = -(normal * a).sum(dim=1)
    counts = torch.zeros(picks.shape[0], dtype=torch.long, device=points.device)
    rows = max(1, chunk_elements // n)
    for s in range(0, picks.shape[0], rows):
        d = torch.addmm(offset[s : s + rows, None], normal[s : s + rows], p.T)
        counts[s : s + rows] = (d.abs() < distance).sum(dim=1)
    counts[~ok] = -1
    best = int(counts.argmax())
    inliers = ((p @ normal[best] + offset[best]).abs() < distance)
    plane = fit_plane(p[inliers]) if int(inliers.sum()) >= 3 else torch.cat([normal[best], offset[best, None]])
    return plane.to(points.dtype), inliers
