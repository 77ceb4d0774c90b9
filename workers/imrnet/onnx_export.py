"""ONNX export of the IMRNet network parts (Li et al., CVPR 2024, Sec. 4.2–4.3), with a parity check.

Two graphs, the two things the scorer asks of the network (``workers.imrnet.network``):

* ``imrnet_reconstruct.onnx``: ``(neigh_vis B×V×k×3, center_vis B×V×3, center_mask B×M×3) →
  pred B×M×k×3`` — mini-PointNet tokens, encoder over the visible patches, decoder with mask
  tokens, prediction head (one round of Algorithm 1).
* ``imrnet_features.onnx``: ``(neigh B×n×k×3, centers B×n×3) → features B×n×(3·d)`` — the DFC
  features (decoder layers 1–3, layer-normed, concatenated; Eqs. 16–17).

Batch, visible, masked and token counts are dynamic axes; ``k`` is fixed by the head. Sampling,
kNN grouping, mask selection, Chamfer distances and the template search stay in numpy / torch
outside the graphs (they are index bookkeeping, not network compute). Export uses PyTorch's
TorchScript-based exporter (``dynamo=False``, opset 17): the dynamo exporter needs
``onnxscript``, which inspectd does not depend on. BatchNorm is exported in eval mode (an
affine op).

:func:`export_cached` keeps the export on disk under the actor's cache directory, keyed by a hash
of the weights (``weights_key``); the ``onnxruntime`` and ``tensorrt`` backends of the scorer
(``IMRNetScorer.use_backend``) run these two graphs through ``workers.backends``.

:func:`parity` runs both graphs in onnxruntime (CPU) on patches of a real-shaped input and
returns the maximum absolute difference to torch per graph.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.imrnet.network import IMRNet

OPSET = 17
RECONSTRUCT_FILE = "imrnet_reconstruct.onnx"
FEATURES_FILE = "imrnet_features.onnx"


class ReconstructGraph(nn.Module):
    """One round of Algorithm 1 as a graph. Built in eval mode: ``torch.onnx.export`` puts a
    module back into the mode it found it in, and a wrapper left in (the default) training mode
    would switch the wrapped network to training mode after export (BatchNorm then uses and
    updates batch statistics: scores change)."""

    def __init__(self, model: IMRNet) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, neigh_vis: torch.Tensor, center_vis: torch.Tensor, center_mask: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(neigh_vis, center_vis, center_mask)


class FeatureGraph(nn.Module):
    """The DFC features as a graph (built in the wrapped network's mode, see ``ReconstructGraph``)."""

    def __init__(self, model: IMRNet) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, neigh: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        return self.model.features(neigh, centers)


def _model_of(obj: Any) -> IMRNet:
    if isinstance(obj, IMRNet):
        return obj
    model = getattr(obj, "model", None)
    if not isinstance(model, IMRNet):
        raise ValueError("export_onnx needs a fitted imrnet scorer or an IMRNet module")
    return model


def example_inputs(model: IMRNet, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped as the scorer feeds them (patch offsets ~0.05, centres in the unit sphere)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n, k = cfg.n_centers, cfg.group_size
    m = max(1, round(0.4 * n))
    neigh = torch.randn(batch, n, k, 3, generator=g) * 0.05
    centers = torch.rand(batch, n, 3, generator=g) * 2 - 1
    return {"neigh": neigh, "centers": centers, "neigh_vis": neigh[:, m:], "center_vis": centers[:, m:],
            "center_mask": centers[:, :m]}


def export_onnx(scorer: Any, path: str | Path, opset: int = OPSET) -> dict[str, Path]:
    """Write ``imrnet_reconstruct.onnx`` and ``imrnet_features.onnx`` into the folder ``path``."""
    model = _model_of(scorer)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    files = {"reconstruct": out / RECONSTRUCT_FILE, "features": out / FEATURES_FILE}
    for name, data in export_graphs(model, opset).items():
        files[name].write_bytes(data)
    return files


def export_graphs(scorer: Any, opset: int = OPSET) -> dict[str, bytes]:
    """The two graphs as ONNX bytes: ``{"reconstruct": ..., "features": ...}`` (the network is
    exported in eval mode and left in eval mode)."""
    model = _model_of(scorer)
    model.eval()
    x = example_inputs(model)
    bufs = {"reconstruct": io.BytesIO(), "features": io.BytesIO()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation / tracer warnings
        torch.onnx.export(
            ReconstructGraph(model), (x["neigh_vis"], x["center_vis"], x["center_mask"]), bufs["reconstruct"],
            dynamo=False, opset_version=opset, input_names=["neigh_vis", "center_vis", "center_mask"],
            output_names=["pred"],
            dynamic_axes={"neigh_vis": {0: "batch", 1: "n_vis"}, "center_vis": {0: "batch", 1: "n_vis"},
                          "center_mask": {0: "batch", 1: "n_mask"}, "pred": {0: "batch", 1: "n_mask"}},
        )
        torch.onnx.export(
            FeatureGraph(model), (x["neigh"], x["centers"]), bufs["features"],
            dynamo=False, opset_version=opset, input_names=["neigh", "centers"], output_names=["features"],
            dynamic_axes={"neigh": {0: "batch", 1: "n"}, "centers": {0: "batch", 1: "n"},
                          "features": {0: "batch", 1: "n"}},
        )
    return {k: b.getvalue() for k, b in bufs.items()}


def weights_key(scorer: Any, opset: int = OPSET) -> str:
    """A hash of the network's weights and sizes, the torch version and the opset: the on-disk key
    of an export (a re-enrolled model, another torch or opset is another export)."""
    model = _model_of(scorer)
    h = hashlib.sha256(f"{model.config}|torch {torch.__version__}|opset {opset}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_cached(scorer: Any, cache_dir: str | Path | None, opset: int = OPSET) -> dict[str, bytes]:
    """:func:`export_graphs`, kept on disk under ``<cache_dir>/imrnet-<weights_key>/`` so that an
    actor (re)start reuses the export; written atomically (several actors may start at once).
    ``cache_dir=None``: export in memory, nothing written."""
    if cache_dir is None:
        return export_graphs(scorer, opset)
    d = Path(cache_dir) / f"imrnet-{weights_key(scorer, opset)}"
    files = {"reconstruct": d / RECONSTRUCT_FILE, "features": d / FEATURES_FILE}
    if all(f.is_file() for f in files.values()):
        return {k: f.read_bytes() for k, f in files.items()}
    graphs = export_graphs(scorer, opset)
    d.mkdir(parents=True, exist_ok=True)
    for k, f in files.items():
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_bytes(graphs[k])
        os.replace(tmp, f)
    return graphs


def parity(scorer: Any, files: dict[str, Path], batch: int = 2, seed: int = 1) -> dict[str, float]:
    """Max |onnxruntime − torch| per graph, on inputs other than the export's (other batch, seed)."""
    import onnxruntime as ort

    model = _model_of(scorer)
    model.eval()
    x = example_inputs(model, batch=batch, seed=seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    result = {}
    with torch.no_grad():
        ref_r = model.reconstruct(x["neigh_vis"], x["center_vis"], x["center_mask"]).numpy()
        ref_f = model.features(x["neigh"], x["centers"]).numpy()
    sess = ort.InferenceSession(str(files["reconstruct"]), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: x[k].numpy() for k in ("neigh_vis", "center_vis", "center_mask")})[0]
    result["reconstruct"] = float(np.abs(got - ref_r).max())
    sess = ort.InferenceSession(str(files["features"]), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"neigh": x["neigh"].numpy(), "centers": x["centers"].numpy()})[0]
    result["features"] = float(np.abs(got - ref_f).max())
    return result
