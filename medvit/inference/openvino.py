"""OpenVINO engines: the ONNX graph in Intel's CPU runtime, in fp32 or NNCF post-training int8.

NNCF quantises activations statically from calibration images, so it needs real inputs: the run's own
images (see `fp32check.reference_inputs`). Both are held to the same fp32 self-check as every engine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from medvit._platform import int8_dot_product
from medvit.inference.engines import ArrayLike, Backend
from medvit.inference.graphs import FEATURES_NAME

_log = logging.getLogger(__name__)

BIN_SUFFIX = ".bin"  # an IR is model.xml (graph) + model.bin (weights), written side by side


@functools.cache
def _core():  # noqa: ANN202 - openvino is an optional dependency (the `fast` extra)
    """The process's one OpenVINO Core. Each Core's CPU plugin installs its own signal stack on the calling thread
    (sigaltstack, for AMX) and puts back the one it found when it is destroyed: two Cores destroyed out of creation
    order left a freed stack installed, and the next Python signal handler (Ctrl-C, SIGTERM, SIGCHLD) then killed
    the process with SIGSEGV. One Core per process, alive until exit, never unwinds out of order."""
    import openvino as ov

    return ov, ov.Core()


def ir_files(xml: Path) -> tuple[Path, Path]:
    """The two files of an OpenVINO IR."""
    return xml, xml.with_suffix(BIN_SUFFIX)


def convert_onnx(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """fp32 IR from a verified-to-be ONNX graph (the batch axis stays dynamic)."""
    ov, _ = _core()
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)  # fp16 weights would be a second, silent change
    return Path(xml_path)


def quantize_int8(onnx_path: str | os.PathLike, xml_path: str | os.PathLike, calibration: np.ndarray) -> Path:
    """NNCF post-training int8 (transformer preset: attention softmax/LayerNorm stay in float) from real images.

    Without an int8 dot product (VNNI/AMX) the u8 x s8 pair sums of AVX2 kernels saturate, as in ONNX
    Runtime; NNCF's overflow fix (7-bit weights in every layer, not just the first) is its remedy.

    Args:
        calibration: preprocessed real images (N, C, H, W), e.g. the run's own val/train images.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    ov, _ = _core()
    model = ov.convert_model(str(onnx_path))
    samples = [np.ascontiguousarray(x[None], dtype=np.float32) for x in calibration]
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)  # NNCF reports every statistics pass at INFO
    try:
        overflow = OverflowFix.FIRST_LAYER if int8_dot_product() else OverflowFix.ENABLE
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stderr, never a command's stdout
            quantized = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(samples),
                                      advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow))
    finally:
        nncf_log.setLevel(level)
    ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


class OpenVinoBackend(Backend):
    """A compiled OpenVINO model on the CPU, latency-tuned, with f32 as the precision of non-int8 ops.

    OpenVINO would otherwise run fp32 graphs in bf16 on AMX/AVX512-BF16 CPUs: a second, unchecked change.
    """

    def __init__(self, xml_path: str | os.PathLike, *, name: str = "openvino", threads: int | None = None) -> None:
        _, core = _core()
        config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.name = name
        self.path = Path(xml_path)
        self.compiled = core.compile_model(str(xml_path), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)
        self._features = next((o for o in self.compiled.outputs if FEATURES_NAME in o.get_names()), None)

    def run(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        out = self._request.infer({0: np.ascontiguousarray(arr, dtype=np.float32)})
        features = None if self._features is None else np.array(out[self._features], dtype=np.float32)
        return np.array(out[self._output], dtype=np.float32), features
