"""Inference backends behind one interface: run a network's forward pass on torch (CPU or
CUDA), ONNX Runtime, or TensorRT, chosen by config and by what is installed.

A scorer hands ``make_runner`` its ``torch.nn.Module`` and example inputs; it gets back a
``NetworkRunner`` whose ``run(*arrays)`` returns numpy arrays, whatever the backend:

* ``torch-cpu`` / ``torch-cuda``: the module itself under ``torch.inference_mode``; on CUDA,
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) when ``compile=True``.
* ``onnxruntime``: the module exported to ONNX (opset 17, dynamic batch axis), run by ONNX
  Runtime with the CUDA provider when present, else the CPU provider.
* ``tensorrt``: an engine built from the same ONNX export, FP16 when asked for, cached on
  disk as ``<cache>/<onnx sha256[:16]>-<gpu>-trt<version>[-fp16].engine``; a change of model,
  GPU or TensorRT version changes the key, so the engine is rebuilt.

A scorer that has its own ONNX export (IMRNet's two graphs, with dynamic token axes) hands
the ONNX bytes to ``onnx_runner`` instead, with the shape ranges its inputs take
(``shape_ranges``: per input name, min / opt / max shapes for the TensorRT optimization
profile; ONNX Runtime needs none). ``fp16="auto"`` builds the FP16 engine and keeps it only
when its outputs on the example inputs are within ``fp16_rtol`` (relative to the largest
reference output) of the torch reference; otherwise it builds and uses the FP32 engine, and
the log says which.

``resolve_backend`` turns the config's ``auto`` into the best one available and refuses a
backend that is asked for but not installed, with the reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("inspectd.backends")
BACKENDS = ("torch-cpu", "torch-cuda", "onnxruntime", "tensorrt")
AUTO_ORDER = ("tensorrt", "torch-cuda", "torch-cpu")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def backend_unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    if backend == "torch-cpu":
        return None
    if backend == "torch-cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if backend == "onnxruntime":
        return None if _importable("onnxruntime") and _importable("onnx") else "onnx / onnxruntime not installed"
    if backend == "tensorrt":
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None if _importable("tensorrt") else "the tensorrt package is not installed"
    return f"unknown backend {backend!r}; known: {BACKENDS}"


def available_backends() -> list[str]:
    return [b for b in BACKENDS if backend_unavailable_reason(b) is None]


def resolve_backend(requested: str, supported: Sequence[str]) -> str:
    """The backend to use: ``auto`` picks the best available one the scorer supports."""
    if requested == "auto":
        for b in AUTO_ORDER:
            if b in supported and backend_unavailable_reason(b) is None:
                return b
        return "torch-cpu"
    if requested not in supported:
        raise ValueError(f"backend {requested!r} is not supported by this scorer (supported: {list(supported)})")
    reason = backend_unavailable_reason(requested)
    if reason:
        raise ValueError(f"backend {requested!r} is not available here: {reason}")
    return requested


class NetworkRunner(ABC):
    """A network's forward pass on one backend: numpy (or torch) in, numpy out."""

    backend: str

    @abstractmethod
    def run(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Outputs of the network for ``inputs`` (batch first), as float32 numpy arrays."""


class TorchRunner(NetworkRunner):
    def __init__(self, module: torch.nn.Module, device: str = "cpu", compile: bool = False) -> None:
        self.backend = "torch-cuda" if device.startswith("cuda") else "torch-cpu"
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.fn = torch.compile(self.module, mode="reduce-overhead") if compile and self.device.type == "cuda" else self.module

    def run(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
            xs = [torch.as_tensor(x).to(self.device, non_blocking=True) for x in inputs]
            out = self.fn(*xs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu().numpy() for o in outs]


def export_onnx(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], n_outputs: int) -> bytes:
    """The module as ONNX bytes (opset 17), with a dynamic batch axis on every input and output."""
    buf = io.BytesIO()
    in_names = [f"input_{i}" for i in range(len(example_inputs))]
    out_names = [f"output_{i}" for i in range(n_outputs)]
    axes = {n: {0: "batch"} for n in in_names + out_names}
    with warnings.catch_warnings():
        # the legacy exporter's tracer warnings: shapes other than the batch axis (e.g. points
        # per patch) are constants of the graph, which is what our networks need
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval().cpu(), tuple(example_inputs), buf, input_names=in_names, output_names=out_names,
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )
    return buf.getvalue()


class OnnxRuntimeRunner(NetworkRunner):
    backend = "onnxruntime"

    def __init__(self, onnx_model: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(onnx_model, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(torch.as_tensor(x).cpu().numpy(), dtype=np.float32) for n, x in zip(self.input_names, inputs, strict=True)}
        return [np.asarray(o, dtype=np.float32) for o in self.session.run(None, feed)]


ShapeRanges = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""Per ONNX input name: (min, opt, max) shapes of a TensorRT optimization profile."""


def engine_cache_path(cache_dir: Path, onnx_model: bytes, fp16: bool, shape_ranges: ShapeRanges | None = None) -> Path:
    """Where the TensorRT engine for this model, GPU and TensorRT version is cached (an explicit
    optimization profile adds a hash of it to the key: another profile is another engine)."""
    import tensorrt as trt

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower()
    key = hashlib.sha256(onnx_model).hexdigest()[:16]
    if shape_ranges:
        key += "-p" + hashlib.sha256(repr(sorted(shape_ranges.items())).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{key}-{gpu}-trt{trt.__version__}{'-fp16' if fp16 else ''}.engine"


class TensorRTRunner(NetworkRunner):
    """TensorRT 10 engine over device buffers owned by torch (no extra CUDA bindings needed)."""

    backend = "tensorrt"

    def __init__(self, onnx_model: bytes, example_inputs: Sequence[torch.Tensor], cache_dir: Path, fp16: bool,
                 max_batch: int = 8, shape_ranges: ShapeRanges | None = None) -> None:
        import tensorrt as trt

        self.trt = trt
        self.fp16 = fp16
        logger = trt.Logger(trt.Logger.WARNING)
        path = engine_cache_path(cache_dir, onnx_model, fp16, shape_ranges)
        self.engine_path = path
        if not path.is_file():
            log.info("building TensorRT engine %s (fp16=%s)", path.name, fp16)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # actors may build at once: atomic rename
            tmp.write_bytes(self._build(onnx_model, example_inputs, fp16, max_batch, logger, shape_ranges))
            os.replace(tmp, path)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _build(self, onnx_model: bytes, examples: Sequence[torch.Tensor], fp16: bool, max_batch: int, logger,
               shape_ranges: ShapeRanges | None = None) -> bytes:
        trt = self.trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        for name, ex in zip(names, examples, strict=True):
            if shape_ranges and name in shape_ranges:
                lo, opt, hi = shape_ranges[name]
            else:  # a dynamic batch axis only
                rest = tuple(ex.shape[1:])
                lo, opt, hi = (1, *rest), (max(1, ex.shape[0]), *rest), (max_batch, *rest)
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError("TensorRT failed to build the engine")
        return bytes(engine)

    def run(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        stream = torch.cuda.current_stream()
        xs = [torch.as_tensor(x).to("cuda", torch.float32).contiguous() for x in inputs]
        for name, x in zip(self.inputs, xs, strict=True):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outs]


def make_runner(
    backend: str,
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    n_outputs: int = 1,
    cache_dir: Path | None = None,
    fp16: bool = True,
    threads: int = 1,
    compile: bool = False,
) -> NetworkRunner:
    """A runner for ``module`` on ``backend`` (already resolved by ``resolve_backend``)."""
    if backend == "torch-cpu":
        return TorchRunner(module, "cpu")
    if backend == "torch-cuda":
        return TorchRunner(module, "cuda", compile=compile)
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
    onnx_model = export_onnx(module, example_inputs, n_outputs)
    return onnx_runner(backend, onnx_model, example_inputs, cache_dir=cache_dir, fp16=fp16, threads=threads)


def onnx_runner(
    backend: str,
    onnx_model: bytes,
    example_inputs: Sequence[torch.Tensor],
    cache_dir: Path | None = None,
    fp16: bool | str = True,
    threads: int = 1,
    shape_ranges: ShapeRanges | None = None,
    reference: Sequence[np.ndarray] | None = None,
    fp16_rtol: float = 1e-2,
) -> NetworkRunner:
    """A runner for an already exported ONNX model on ``onnxruntime`` or ``tensorrt``.

    ``fp16="auto"`` (TensorRT): keep the FP16 engine only when its outputs for
    ``example_inputs`` are within ``fp16_rtol`` × max |reference| of ``reference`` (the torch
    outputs for the same inputs), else use an FP32 engine. ``shape_ranges``: see the module doc.
    """
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(onnx_model, threads)
    if backend != "tensorrt":
        raise ValueError(f"onnx_runner runs onnxruntime or tensorrt, not {backend!r}")
    cache = Path(cache_dir or "models/.trt-cache")
    if fp16 != "auto":
        return TensorRTRunner(onnx_model, example_inputs, cache, bool(fp16), shape_ranges=shape_ranges)
    if reference is None:
        raise ValueError("fp16='auto' needs the torch reference outputs of the example inputs")
    runner = TensorRTRunner(onnx_model, example_inputs, cache, True, shape_ranges=shape_ranges)
    err = max_relative_error(runner.run(*example_inputs), reference)
    if err <= fp16_rtol:
        log.info("TensorRT FP16 engine kept: max error %.3g of the largest output (tolerance %.3g)", err, fp16_rtol)
        return runner
    log.info("TensorRT FP16 engine off: max error %.3g of the largest output > %.3g; FP32 engine", err, fp16_rtol)
    return TensorRTRunner(onnx_model, example_inputs, cache, False, shape_ranges=shape_ranges)


def max_relative_error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """max |output − reference| over all outputs, divided by max(1e-12, max |reference|) of each."""
    errs = [float(np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).max())
            / max(1e-12, float(np.abs(r).max())) for o, r in zip(outputs, reference, strict=True)]
    return max(errs) if errs else 0.0
