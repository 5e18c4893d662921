"""Inference backends: one callable interface over torch fp32/bf16/compile and ONNX Runtime fp32/int8.

Every backend takes a float32 NCHW batch (tensor or array) and returns float32 logits as a numpy
array, so the Predictor, the batch predictor and the benchmark never care which engine ran.
`auto` picks the fastest backend whose probabilities match eager fp32 within `AUTO_TOLERANCE` on a
short self-check, and caches that choice per weights + machine so an app start does not redo it.
A backend that fails or drifts is never chosen: "fast" must not mean "silently wrong"."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from medvit._platform import bf16_supported, cache_root
from medvit.errors import ConfigError
from medvit.inference import AUTO, BACKENDS
from medvit.inference.graphs import FEATURES_NAME, export_onnx

_log = logging.getLogger(__name__)




# Max |delta p| (sigmoid of the logits) against eager fp32 for `auto` to accept a backend (and for an int8
# export to be kept): a flag can only flip for a probability within 0.02 of its threshold, well inside the
# calibration error of any model, while a broken graph or an overflowing bf16 kernel is still caught.
AUTO_TOLERANCE = 0.02


ArrayLike = np.ndarray | torch.Tensor


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, or None when it can."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or {AUTO}")
    if name.endswith("bf16") and not bf16_supported():
        return "the CPU lacks native bf16 (avx512_bf16 / amx_bf16)"
    if name.startswith("torch-compile") and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "torch.compile needs a C++ compiler (g++) on PATH"
    if name.startswith("onnx") and not (_have("onnx") and _have("onnxruntime")):
        return 'onnx and onnxruntime are not installed: pip install "medvit[fast]"'
    if name.startswith("openvino") and not (_have("onnx") and _have("openvino")):
        return 'openvino is not installed: pip install "medvit[fast]"'
    if name == "openvino-int8" and not _have("nncf"):
        return 'nncf (OpenVINO\'s quantiser) is not installed: pip install "medvit[fast]"'
    return None


def available_backends() -> list[str]:
    """The backends that can run here, in BACKENDS order."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


class Backend:
    """A model behind one calling convention: float32 NCHW in, float32 (N, K) logits out."""

    name: str = "base"

    def run(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features) of one pass; features None where this engine's graph has none."""
        raise NotImplementedError

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return self.run(x)[0]


class TorchBackend(Backend):
    """Eager or compiled torch, in fp32 or bf16 (weights *and* activations, with fp32 logits out)."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float32, compiled: bool = False,
                 compile_cache: Path | None = None) -> None:
        self.dtype = dtype
        self.name = ("torch-compile" if compiled else "torch") + ("-bf16" if dtype == torch.bfloat16 else "")
        module = model.eval()
        if dtype != torch.float32:
            module = copy.deepcopy(module).to(dtype)  # never mutate the caller's fp32 reference
        self.model: Callable[[torch.Tensor], torch.Tensor] = module
        if compiled:
            if compile_cache is not None:
                # FX-graph + inductor caches on disk: the next process reuses the compiled kernels.
                compile_cache.mkdir(parents=True, exist_ok=True)
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
            self.model = torch.compile(module)  # static first; a 2nd batch size recompiles once with a dynamic batch

    def run(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        """Eager fp32 gives the features of the same pass; compiled and bf16 modules give logits only."""
        t = torch.as_tensor(x, dtype=torch.float32)
        both = getattr(self.model, "forward_with_features", None) if self.name == "torch" else None
        with torch.inference_mode():
            if both is not None:
                logits, features = both(t)
                return logits.float().numpy(), features.float().numpy()
            out = self.model(t.to(self.dtype))
        return out.float().numpy(), None


class OnnxBackend(Backend):
    """An ONNX Runtime session on CPU with all graph optimisations."""

    def __init__(self, path: str | os.PathLike, *, name: str = "onnx", threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.name = name
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self._outputs = [names[0], *([FEATURES_NAME] if FEATURES_NAME in names else [])]

    def run(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        out = self.session.run(self._outputs, {self._input: np.ascontiguousarray(arr, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32), (np.asarray(out[1], dtype=np.float32) if len(out) > 1 else None)


def create_backend(name: str, model: nn.Module, *, input_size: Sequence[int],
                   graph_provider: Callable[[str], Backend] | None = None, work_dir: Path | None = None,
                   warmup: bool = True) -> Backend:
    """Build backend `name` over `model`.

    Args:
        name: one of BACKENDS.
        model: the fp32 module (left unchanged).
        input_size: [C, H, W] of one input, for the warm-up and the ONNX graph.
        graph_provider: builds a GRAPH_ENGINES engine over a verified graph file (ONNX, or an OpenVINO IR;
            see `export.verified_engine`). Needed for OpenVINO; ONNX defaults to an unverified export into
            `work_dir`. The Predictor passes the run's verified exports.
        work_dir: where ONNX files and the inductor cache live (default: the user cache dir).
        warmup: run one batch-1 forward now (compiles torch-compile, allocates ORT buffers).
    """
    reason = unavailable_reason(name)
    if reason:
        raise ConfigError(f"backend {name} is not available: {reason}")
    work_dir = work_dir or cache_root() / "work"
    if name == "torch":
        backend: Backend = TorchBackend(model)
    elif name == "torch-bf16":
        backend = TorchBackend(model, dtype=torch.bfloat16)
    elif name.startswith("torch-compile"):
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        backend = TorchBackend(model, dtype=dtype, compiled=True, compile_cache=cache_root() / "inductor")
    elif graph_provider is not None:
        backend = graph_provider(name)
    elif name.startswith("onnx"):
        int8 = name == "onnx-int8"
        path = export_onnx(model, work_dir / ("model.int8.onnx" if int8 else "model.onnx"), input_size, int8=int8)
        backend = OnnxBackend(path, name=name)
    else:
        raise ConfigError(f"backend {name} needs a verified graph (graph_provider): use Predictor or medvit export")
    if warmup:
        t0 = time.perf_counter()
        backend(np.zeros((1, *input_size), dtype=np.float32))
        _log.debug("%s warm-up took %.1f s", name, time.perf_counter() - t0)
    return backend


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Raw probabilities from logits, in float64 (scipy's expit: no overflow warnings for large logits)."""
    return expit(np.asarray(z, dtype=np.float64))


def max_prob_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |sigmoid(a) - sigmoid(b)|: the drift a clinician would see in the raw probabilities."""
    return float(np.max(np.abs(sigmoid(a) - sigmoid(b))))


def median_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of `fn` in ms (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
